"""Decode attention for sequences that share a prompt prefix (GRPO's n samples of one prompt):
the shared KV pages are read once per group instead of once per sequence.

Reference: ``attention_ref.paged_attention_ref`` on rows with one query each.

With prefix caching the n samples of a prompt hold the same physical blocks for the prompt's full
blocks, and the plain decode kernel reads those blocks n times per step (W2's shape: prompts of
256-512 tokens, 8 samples, outputs of up to ~600: most of a step's KV bytes are the shared
prompts). Here attention over a sequence's KV is split at its group's shared length P (a multiple
of the block size) into two partials, merged by their log-sum-exps like split-KV decoding:

- prefix programs, one per (group, KV head): every member's query rows for that KV head packed in
  one tile (members x GQA group rows; tensor-core friendly), positions [0, P) read once through
  the group's block table (its first member's), a partial written to each member's slot 0;
- suffix programs, one per (sequence, KV head): positions [P, seq_len) of its own pages, slot 1;
- the split-merge kernel of ``decode_attention`` (two slots).

A sequence without a group to share with is a group of one with P = 0 (its slot 0 is empty). The
grid depends only on the group count and the members per group, so it can be replayed in a CUDA
graph with other groupings of the same size. Sliding windows are not supported.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import triton
import triton.language as tl

from rollout.kernels._checks import check_index, check_query, output_like
from rollout.kernels.decode_attention import _attend_pages, _merge_splits_kernel, _split_chunk, _store_partial

_LOG2E = 1.4426950408889634


@triton.jit(do_not_specialize=["stride_bt"])
def _prefix_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, members_ptr, prefix_lens_ptr, part_out_ptr,
    part_lse_ptr, scale_log2, stride_qb, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb,
    stride_vs, stride_vh, stride_bt,
    GROUP: tl.constexpr, MEMBERS: tl.constexpr, ROWS_PAD: tl.constexpr, NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """Program (group, KV head): the group's shared prefix for every member at once, into slot 0."""
    grp = tl.program_id(0)
    kv_head = tl.program_id(1)
    r = tl.arange(0, ROWS_PAD)  # row r: member r // GROUP, query head r % GROUP of the KV head
    member = tl.load(members_ptr + grp * MEMBERS + r // GROUP, mask=r < MEMBERS * GROUP, other=-1)
    row_mask = member >= 0
    b = tl.where(row_mask, member, 0).to(tl.int64)
    heads = kv_head * GROUP + r % GROUP
    d = tl.arange(0, BLOCK_D)
    q = tl.load(
        q_ptr + b[:, None] * stride_qb + heads[:, None] * stride_qh + d[None, :],
        mask=row_mask[:, None] & (d < HEAD_DIM)[None, :],
        other=0.0,
    )
    first = tl.maximum(tl.load(members_ptr + grp * MEMBERS), 0).to(tl.int64)  # its table holds the prefix
    m_i = tl.full([ROWS_PAD], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([ROWS_PAD], dtype=tl.float32)
    acc = tl.zeros([ROWS_PAD, BLOCK_D], dtype=tl.float32)
    acc, m_i, l_i = _attend_pages(
        acc, m_i, l_i, q, block_tables_ptr + first * stride_bt, kv_head, 0, tl.load(prefix_lens_ptr + grp),
        k_cache_ptr, v_cache_ptr, scale_log2, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs,
        stride_vh, HEAD_DIM, BLOCK_D, BLOCK_SIZE, BLOCK_N, True, PRECISION,
    )  # fmt: skip
    row = (b * NUM_KV_HEADS * GROUP + heads) * 2
    _store_partial(part_out_ptr, part_lse_ptr, acc, m_i, l_i, row, row_mask, HEAD_DIM, BLOCK_D)


@triton.jit(do_not_specialize=["stride_bt"])
def _suffix_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, starts_ptr, part_out_ptr,
    part_lse_ptr, scale_log2, stride_qb, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb,
    stride_vs, stride_vh, stride_bt,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Program (sequence, KV head): positions [start, seq_len) of its own pages, into slot 1."""
    b = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    g = tl.arange(0, GROUP_PAD)
    head_mask = g < GROUP
    heads = kv_head * GROUP + g
    d = tl.arange(0, BLOCK_D)
    q = tl.load(
        q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
        mask=head_mask[:, None] & (d < HEAD_DIM)[None, :],
        other=0.0,
    )
    m_i = tl.full([GROUP_PAD], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, BLOCK_D], dtype=tl.float32)
    acc, m_i, l_i = _attend_pages(
        acc, m_i, l_i, q, block_tables_ptr + b * stride_bt, kv_head, tl.load(starts_ptr + b),
        tl.load(seq_lens_ptr + b), k_cache_ptr, v_cache_ptr, scale_log2, stride_kb, stride_ks,
        stride_kh, stride_vb, stride_vs, stride_vh, HEAD_DIM, BLOCK_D, BLOCK_SIZE, BLOCK_N, True, PRECISION,
    )  # fmt: skip
    row = (b * NUM_KV_HEADS * GROUP + heads) * 2 + 1
    _store_partial(part_out_ptr, part_lse_ptr, acc, m_i, l_i, row, head_mask, HEAD_DIM, BLOCK_D)


def shared_prefix_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    members: torch.Tensor,
    prefix_lens: torch.Tensor,
    starts: torch.Tensor,
    scale: float,
    block_n: int = 64,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention ``q`` [B, Hq, D] -> [B, Hq, D] over paged KV, each group's shared prefix
    read once (see the module docstring; the groups from ``shared_prefix_groups``).

    ``members`` (int32 [G, M]): the rows of each group, -1 padding; every row in exactly one group.
    ``prefix_lens`` (int32 [G]): positions [0, P) shared by the group's members, read through the
    block table of its first member; a multiple of the block size, below every member's length.
    ``starts`` (int32 [B]): each row's P. The rest as ``decode_attention`` (no window).
    """
    block_size, num_kv_heads, head_dim = check_query(q, k_cache, v_cache)
    batch, num_heads, _ = q.shape
    check_index("block_tables", block_tables, (batch, -1), k_cache.device)
    check_index("seq_lens", seq_lens, (batch,), k_cache.device)
    check_index("members", members, (-1, -1), k_cache.device)
    check_index("prefix_lens", prefix_lens, (members.shape[0],), k_cache.device)
    check_index("starts", starts, (batch,), k_cache.device)
    if not members.is_contiguous():
        raise ValueError(f"members must be contiguous, got strides {members.stride()}")
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two >= 16, got {block_n}")
    out = output_like(q, out)
    if batch == 0:
        return out
    group = num_heads // num_kv_heads
    num_groups, num_members = members.shape
    part_out = torch.empty(batch, num_heads, 2, head_dim, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(batch, num_heads, 2, dtype=torch.float32, device=q.device)
    p2 = triton.next_power_of_2
    common = dict(
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_D=p2(head_dim),
        BLOCK_SIZE=block_size,
        BLOCK_N=block_n,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    strides = (
        q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3], block_tables.stride(0),
    )  # fmt: skip
    scale_log2 = scale * _LOG2E
    if num_groups:
        _prefix_kernel[(num_groups, num_kv_heads)](
            q, k_cache, v_cache, block_tables, members, prefix_lens, part_out, part_lse, scale_log2,
            *strides, GROUP=group, MEMBERS=num_members, ROWS_PAD=max(16, p2(num_members * group)),
            **common,
        )  # fmt: skip
    _suffix_kernel[(batch, num_kv_heads)](
        q, k_cache, v_cache, block_tables, seq_lens, starts, part_out, part_lse, scale_log2, *strides,
        GROUP=group, GROUP_PAD=max(16, p2(group)), **common,
    )  # fmt: skip
    _merge_splits_kernel[(batch, num_kv_heads)](
        part_out, part_lse, out, 2, out.stride(0), out.stride(1), GROUP=group, GROUP_P2=p2(group),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_D=p2(head_dim), SPLITS_PAD=2,
        SPLIT_CHUNK=_split_chunk(group, head_dim, 2), num_warps=4,
    )  # fmt: skip
    return out


def shared_prefix_groups(
    block_tables: Sequence[Sequence[int]], seq_lens: Sequence[int], block_size: int, max_members: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Group decode rows by the full KV blocks they share from position 0 (prefix caching gives
    the n samples of a prompt the same physical blocks): rows with the same first block, at most
    ``max_members`` per group, each group sharing the longest run of leading blocks common to its
    members and ending before every member's last position. Returns (members [G, max_members],
    prefix_lens [G], starts [B]) as int32 arrays for ``shared_prefix_decode``."""
    if max_members < 1 or block_size < 1:
        raise ValueError(f"need max_members >= 1 and block_size >= 1, got {max_members}, {block_size}")
    by_first: dict[int, list[int]] = {}
    for b, (table, length) in enumerate(zip(block_tables, seq_lens, strict=True)):
        key = table[0] if length > block_size else -1 - b  # one block or less: nothing to share
        by_first.setdefault(key, []).append(b)
    groups, prefixes = [], []
    for rows in by_first.values():
        for i in range(0, len(rows), max_members):
            chunk = rows[i : i + max_members]
            # full blocks strictly before each member's last position (that block may still fill)
            shared = min((seq_lens[b] - 1) // block_size for b in chunk)
            first = block_tables[chunk[0]]
            for b in chunk[1:]:
                table = block_tables[b]
                n = 0
                while n < shared and table[n] == first[n]:
                    n += 1
                shared = n
            groups.append(chunk)
            prefixes.append(shared * block_size if len(chunk) > 1 else 0)
    members = np.full((len(groups), max_members), -1, dtype=np.int32)
    starts = np.zeros(len(seq_lens), dtype=np.int32)
    for g, (rows, prefix) in enumerate(zip(groups, prefixes, strict=True)):
        members[g, : len(rows)] = rows
        starts[rows] = prefix
    return members, np.asarray(prefixes, dtype=np.int32), starts
