"""Test helper: a paged KV cache for a model and the per-step AttentionMetadata the runner would build."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rollout.models.layers.attention import AttentionMetadata


@dataclass
class SeqChunk:
    """One sequence's share of a step."""

    tokens: list[int]  # the sequence's tokens (at least num_computed + num_new of them)
    num_computed: int  # tokens whose K/V are already in the cache
    num_new: int  # tokens fed this step (positions num_computed .. num_computed + num_new - 1)
    block_ids: list[int]  # the sequence's cache blocks, in order


def bind_kv_caches(model: torch.nn.Module, num_blocks: int, block_size: int, seed: int = 0) -> None:
    """Give every attention layer its own [num_blocks, block_size, kv_heads, head_dim] K and V cache,
    filled with noise so that reading a slot nobody wrote shows up as a logits mismatch."""
    gen = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    for attn in model.attention_layers():
        shape = (num_blocks, block_size, attn.num_kv_heads, attn.head_dim)
        attn.k_cache = torch.randn(shape, generator=gen).to(dtype)
        attn.v_cache = torch.randn(shape, generator=gen).to(dtype)


def build_step(
    chunks: list[SeqChunk], block_size: int
) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """Flatten the chunks into (input_ids [T], positions [T], metadata)."""
    input_ids, positions, slots, seq_lens, starts = [], [], [], [], [0]
    for chunk in chunks:
        end = chunk.num_computed + chunk.num_new
        assert end <= len(chunk.tokens) and -(-end // block_size) <= len(chunk.block_ids), (
            "chunk out of range"
        )
        for pos in range(chunk.num_computed, end):
            input_ids.append(chunk.tokens[pos])
            positions.append(pos)
            slots.append(chunk.block_ids[pos // block_size] * block_size + pos % block_size)
        seq_lens.append(end)
        starts.append(starts[-1] + chunk.num_new)
    width = max(len(chunk.block_ids) for chunk in chunks)
    # Padding entries must still be valid block ids: the reference kernel gathers, then masks.
    tables = [chunk.block_ids + [0] * (width - len(chunk.block_ids)) for chunk in chunks]
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        block_tables=torch.tensor(tables, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens_host=seq_lens,
        query_start_loc_host=starts,
        max_seq_len=max(seq_lens),
        max_query_len=max(chunk.num_new for chunk in chunks),
    )
    return torch.tensor(input_ids, dtype=torch.int64), torch.tensor(positions, dtype=torch.int64), meta


def assign_blocks(lengths: list[int], block_size: int, num_blocks: int, seed: int = 0) -> list[list[int]]:
    """Disjoint, shuffled (non-contiguous) block ids for sequences of the given lengths."""
    perm = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
    out, offset = [], 0
    for length in lengths:
        need = -(-length // block_size)
        out.append(perm[offset : offset + need])
        offset += need
    assert offset <= num_blocks, "not enough blocks"
    return out


@torch.no_grad()
def prefill_logits(
    model: torch.nn.Module, seqs: list[list[int]], block_size: int, num_blocks: int
) -> torch.Tensor:
    """Logits [sum(len), vocab] of all sequences run as one flattened prefill step."""
    bind_kv_caches(model, num_blocks, block_size)
    blocks = assign_blocks([len(s) for s in seqs], block_size, num_blocks)
    chunks = [SeqChunk(s, 0, len(s), b) for s, b in zip(seqs, blocks, strict=True)]
    input_ids, positions, meta = build_step(chunks, block_size)
    return model.compute_logits(model(input_ids, positions, meta))
