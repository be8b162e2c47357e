"""Paged KV blocks: a free queue, reference counts, and automatic prefix caching.

A block holds ``block_size`` tokens of KV for every layer. Once a block is full and computed, it is
registered under a chained hash of its tokens (hash of the parent block's hash + its own token ids),
so a later request whose prompt starts with the same tokens reuses it. Blocks whose ref count drops
to zero keep their contents and hash and go to the back of the free queue; they are evicted (their
hash forgotten) only when the front of the queue is handed out again. Sequences free their blocks
back to front, so the tail of a prefix is evicted before its head.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence


def hash_block(parent: bytes | None, token_ids: Sequence[int]) -> bytes:
    """Chained content hash of one full block (128-bit blake2b: collisions are not a practical risk)."""
    h = hashlib.blake2b(parent or b"", digest_size=16)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


class BlockManager:
    """Owns block ids ``0..num_blocks-1``. Plain CPU Python: no tensors, testable on its own."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # hash -> block id holding those tokens
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        # Seeds every hash chain. The engine sets it to the weight version, so KV computed under
        # other weights (requests kept in flight across an update) can never be matched.
        self.hash_salt = b""
        # Counters for metrics and tests.
        self.num_hit_tokens = 0
        self.num_queried_tokens = 0

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now (unreferenced, cached or not)."""
        return len(self.free_queue)

    def usage(self) -> float:
        return 1.0 - len(self.free_queue) / self.num_blocks

    def compute_hashes(self, token_ids: Sequence[int], hashes: list[bytes]) -> None:
        """Extend ``hashes`` in place to cover every full block of ``token_ids``."""
        bs = self.block_size
        for i in range(len(hashes), len(token_ids) // bs):
            parent = hashes[-1] if hashes else self.hash_salt
            hashes.append(hash_block(parent, token_ids[i * bs : (i + 1) * bs]))

    def match_prefix(self, hashes: Sequence[bytes], max_blocks: int) -> list[int]:
        """Ids of the longest run of cached blocks matching ``hashes`` (at most ``max_blocks``).
        Nothing is acquired: call ``acquire`` before the next allocation."""
        hits: list[int] = []
        if not self.enable_prefix_caching:
            return hits
        for h in hashes[:max_blocks]:
            block = self.cached.get(h)
            if block is None:
                break
            hits.append(block)
        return hits

    def acquire(self, block_ids: Sequence[int]) -> None:
        """Take a reference on cached blocks (returned by ``match_prefix``)."""
        for b in block_ids:
            if self.ref_counts[b] == 0:
                del self.free_queue[b]
            self.ref_counts[b] += 1

    def blocks_needed(self, num_held: int, num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - num_held)

    def can_allocate(self, num_new_blocks: int) -> bool:
        return num_new_blocks <= len(self.free_queue)

    def allocate(self, num_new_blocks: int) -> list[int]:
        """Hand out fresh blocks (ref count 1), evicting the oldest cached contents."""
        if num_new_blocks > len(self.free_queue):
            raise RuntimeError(f"asked for {num_new_blocks} blocks, {len(self.free_queue)} free")
        out = []
        for _ in range(num_new_blocks):
            b, _ = self.free_queue.popitem(last=False)
            h = self.block_hash[b]
            if h is not None:
                self.block_hash[b] = None
                if self.cached.get(h) == b:
                    del self.cached[h]
            self.ref_counts[b] = 1
            out.append(b)
        return out

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference on each block, back to front (tail blocks are evicted first)."""
        for b in reversed(block_ids):
            assert self.ref_counts[b] > 0, f"double free of block {b}"
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                self.free_queue[b] = None

    def cache_blocks(self, block_ids: Sequence[int], hashes: Sequence[bytes], start: int, end: int) -> None:
        """Register blocks ``start..end-1`` (full and computed) under their hashes. A hash already held
        by another block stays with that block; this one stays private."""
        if not self.enable_prefix_caching:
            return
        for i in range(start, end):
            b, h = block_ids[i], hashes[i]
            if self.block_hash[b] is None and h not in self.cached:
                self.block_hash[b] = h
                self.cached[h] = b

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash (after a weight update). Blocks in use keep their contents but
        can no longer be matched. Returns True."""
        self.cached.clear()
        self.block_hash = [None] * self.num_blocks
        return True

    def check_invariants(self, held: Sequence[Sequence[int]]) -> None:
        """Assert the pool is consistent with the block lists that requests hold (tests, debugging)."""
        counts = [0] * self.num_blocks
        for blocks in held:
            for b in blocks:
                counts[b] += 1
        assert counts == self.ref_counts, "ref counts differ from the blocks requests hold"
        free = {b for b in range(self.num_blocks) if counts[b] == 0}
        assert free == set(self.free_queue), "free queue differs from unreferenced blocks"
        for h, b in self.cached.items():
            assert self.block_hash[b] == h, f"cache entry for block {b} is stale"
