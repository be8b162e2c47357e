import pytest

from rollout.block_manager import BlockManager


def test_allocate_free_and_counts():
    bm = BlockManager(4, 2)
    a = bm.allocate(3)
    assert len(set(a)) == 3 and bm.num_free_blocks == 1
    with pytest.raises(RuntimeError):
        bm.allocate(2)
    bm.free(a)
    assert bm.num_free_blocks == 4
    bm.check_invariants([])
    with pytest.raises(AssertionError, match="double free"):
        bm.free(a[:1])


def test_prefix_hit_shares_blocks_and_survives_free():
    bm = BlockManager(8, 2)
    tokens = [1, 2, 3, 4, 5]
    hashes: list[bytes] = []
    bm.compute_hashes(tokens, hashes)
    assert len(hashes) == 2  # the partial last block is not hashed
    blocks = bm.allocate(3)
    bm.cache_blocks(blocks, hashes, 0, 2)
    hit = bm.match_prefix(hashes, 10)
    assert hit == blocks[:2]
    bm.acquire(hit)
    assert bm.ref_counts[blocks[0]] == 2
    bm.free(blocks)
    bm.free(hit)
    assert bm.num_free_blocks == 8
    # unreferenced cached blocks still match until evicted
    assert bm.match_prefix(hashes, 10) == blocks[:2]
    bm.check_invariants([])


def test_chained_hash_depends_on_parent():
    bm = BlockManager(4, 2)
    h1: list[bytes] = []
    h2: list[bytes] = []
    bm.compute_hashes([1, 2, 3, 4], h1)
    bm.compute_hashes([9, 9, 3, 4], h2)
    assert h1[1] != h2[1]  # same tokens in block 1, different prefix


def test_eviction_takes_oldest_and_tail_first():
    bm = BlockManager(4, 1)
    hashes: list[bytes] = []
    bm.compute_hashes([10, 11, 12, 13], hashes)
    blocks = bm.allocate(4)
    bm.cache_blocks(blocks, hashes, 0, 4)
    bm.free(blocks)  # back to front: tail block is first in the free queue
    fresh = bm.allocate(1)
    assert fresh == [blocks[3]]
    assert bm.match_prefix(hashes, 4) == blocks[:3]  # head of the prefix survives
    bm.free(fresh)
    bm.check_invariants([])


def test_duplicate_hash_keeps_first_owner():
    bm = BlockManager(4, 2)
    hashes: list[bytes] = []
    bm.compute_hashes([1, 2], hashes)
    a, b = bm.allocate(1), bm.allocate(1)
    bm.cache_blocks(a, hashes, 0, 1)
    bm.cache_blocks(b, hashes, 0, 1)
    assert bm.match_prefix(hashes, 1) == a
    bm.free(b)
    bm.allocate(3)  # evicts b (and more) without touching a's cache entry
    assert bm.match_prefix(hashes, 1) == a
    bm.check_invariants([a, *[[x] for x in range(4) if bm.ref_counts[x] and x not in a]])


def test_reset_prefix_cache_forgets_everything():
    bm = BlockManager(4, 2)
    hashes: list[bytes] = []
    bm.compute_hashes([1, 2, 3, 4], hashes)
    blocks = bm.allocate(2)
    bm.cache_blocks(blocks, hashes, 0, 2)
    assert bm.reset_prefix_cache()
    assert bm.match_prefix(hashes, 2) == []
    bm.free(blocks)
    bm.check_invariants([])


def test_prefix_caching_off_never_matches():
    bm = BlockManager(4, 2, enable_prefix_caching=False)
    hashes: list[bytes] = []
    bm.compute_hashes([1, 2], hashes)
    blocks = bm.allocate(1)
    bm.cache_blocks(blocks, hashes, 0, 1)
    assert bm.match_prefix(hashes, 1) == []
