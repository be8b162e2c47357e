"""Varlen causal attention of ragged query chunks over the paged KV cache (prefill / extend), in Triton.

Reference: ``attention_ref.paged_attention_ref``. The query rows of sequence i are its last
``q_len`` positions (a prompt chunk after a cached prefix, or a single decode token in a mixed
batch); their K/V are already stored in the cache. One program computes a BLOCK_M x head_dim tile
of one query head (or, with ``pack_gqa``, BLOCK_M / group positions of every head of one GQA group,
which then share each K/V tile) with flash-attention tiles over BLOCK_N keys gathered page by page,
fp32 accumulation and an online softmax. Keys left of the tile's first query position need no causal
mask, so they run in a first loop without it; the diagonal tiles run in a second, masked loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from rollout.kernels._checks import check_index, check_query, check_window, output_like

_LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class ExtendConfig:
    """Launch parameters of the extend kernel (the launcher picks them when none is given)."""

    block_m: int = 128  # query rows per program (with pack_gqa: rows x heads of the group)
    block_n: int = 32  # keys per tile
    num_warps: int = 4
    num_stages: int = 3
    # One program per KV head: its whole GQA group's query heads share each K/V tile (the tile holds
    # block_m // group positions x group heads), so K/V are read once per group instead of once per
    # query head. Taken only when the group is a power of two dividing block_m.
    pack_gqa: bool = False


def _check_config(config: ExtendConfig) -> None:
    """Tile shapes the kernel can be built with (``tl.arange`` needs powers of two; ``tl.dot``'s
    reduction over a key tile needs at least 16 keys)."""

    def p2(n: int) -> bool:
        return isinstance(n, int) and n >= 1 and n & (n - 1) == 0

    if not (p2(config.block_m) and p2(config.block_n) and config.block_n >= 16 and p2(config.num_warps)):
        raise ValueError(
            f"bad extend config {config}: block_m and num_warps must be powers of two, block_n a "
            "power of two >= 16"
        )


def _packable(group: int) -> bool:
    """Whether a GQA group of ``group`` query heads can share one program's tile (a power of two > 1)."""
    return group > 1 and group & (group - 1) == 0


def _pack_heads(config: ExtendConfig, group: int) -> int:
    """Query heads per program under ``config``: the whole GQA group when it packs, else 1."""
    pack = config.pack_gqa and _packable(group) and config.block_m % group == 0
    return group if pack else 1


def default_extend_config(
    max_query_len: int, head_dim: int, group: int = 1, dtype: torch.dtype = torch.bfloat16
) -> ExtendConfig:
    """Packed GQA tiles where the group allows; smaller query tiles for short chunks, so mixed
    batches waste less of each tile."""
    positions = min(128, max(16, triton.next_power_of_2(max_query_len)))
    if head_dim > 128:  # wider heads get smaller query tiles (registers)
        return ExtendConfig(block_m=min(positions, 64))
    if _packable(group):
        # H100, bf16, head_dim 128 (`attention_kernels.py --extend --sweep`): 64 x 2048 prompts,
        # 256 x 64 tiles, 8 warps 347 TFLOP/s at group 2 and 368 at group 4, against 316 and 320
        # unpacked; W1-like chunks of 100-1024 tokens: packed 128 x 32 tiles 158 us, unpacked 173.
        # Not for fp32: at head_dim 128 its fp32 tiles need more shared memory than a Hopper block
        # may have, and Triton refuses the launch (test_extend_gpu_fp32_configs_are_exact).
        if max_query_len >= 2048 and dtype != torch.float32:
            return ExtendConfig(block_m=256, block_n=64, num_warps=8, num_stages=3, pack_gqa=True)
        return ExtendConfig(block_m=min(128, positions * group), pack_gqa=True)
    # 128 x 32 tiles, 4 warps, 3 stages was the fastest of 18 unpacked configs at 64 x 2048 on the
    # H100 (317 TFLOP/s; 128 x 64 x 8 warps: 264).
    return ExtendConfig(block_m=positions)


@triton.jit
def _attend_tile(
    acc,
    m_i,
    l_i,
    q,
    q_pos,
    k_cache_ptr,
    v_cache_ptr,
    table,
    kv_head,
    n0,
    n_end,
    window,
    scale_log2,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One BLOCK_N tile of keys starting at n0 folded into the running softmax state."""
    pos = n0 + tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    valid = pos < n_end
    page = tl.load(table + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    in_page = pos % BLOCK_SIZE
    kv_mask = valid[:, None] & (d[None, :] < HEAD_DIM)
    k_rows = k_cache_ptr + page * stride_kb + in_page * stride_ks + kv_head * stride_kh
    k = tl.load(k_rows[:, None] + d[None, :], mask=kv_mask, other=0.0)
    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
    if CAUSAL:
        allowed = (pos[None, :] <= q_pos[:, None]) & valid[None, :]
        if HAS_WINDOW:
            allowed &= pos[None, :] > q_pos[:, None] - window
        qk = tl.where(allowed, qk, float("-inf"))
    elif HAS_WINDOW:
        qk = tl.where(pos[None, :] > q_pos[:, None] - window, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, axis=1))
    p = tl.exp2(qk - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v_rows = v_cache_ptr + page * stride_vb + in_page * stride_vs + kv_head * stride_vh
    v = tl.load(v_rows[:, None] + d[None, :], mask=kv_mask, other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i


# The block table's row stride changes with the batch's longest sequence, and first_seq with the
# step: not specialized (a new value's divisibility by 16 would compile a new kernel mid-serving).
@triton.jit(do_not_specialize=["stride_bt", "first_seq"])
def _extend_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    query_start_ptr,
    out_ptr,
    scale_log2,
    window,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_bt,
    stride_ot,
    stride_oh,
    first_seq,
    tiles_ptr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    PRECISION: tl.constexpr,
    PACK: tl.constexpr,  # query heads per program: 1, or GROUP (pack_gqa)
    TILE_LIST: tl.constexpr,  # program_id(1) indexes (sequence, query tile) pairs at tiles_ptr
):
    if TILE_LIST:  # a grid that does not depend on the chunk lengths (see extend_tiles)
        t = tl.program_id(1)
        b = tl.load(tiles_ptr + 2 * t)
        if b < 0:  # padding entry
            return
        m_tile = tl.load(tiles_ptr + 2 * t + 1)
    else:
        # The latest query tiles see the most keys: run them first to shorten the grid's tail.
        m_tile = tl.num_programs(1) - 1 - tl.program_id(1)
        b = tl.program_id(2) + first_seq
    q_start = tl.load(query_start_ptr + b)
    q_len = tl.load(query_start_ptr + b + 1) - q_start
    m0 = m_tile * BLOCK_M
    if m0 >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + b)
    first_pos = seq_len - q_len + m0  # position of the tile's first query row
    if PACK > 1:  # tile row i: position i // PACK of head i % PACK of the program's group
        idx = tl.arange(0, BLOCK_M * PACK)
        tok = idx // PACK
        kv_head = tl.program_id(0)
        q_head = (kv_head * PACK + idx % PACK)[:, None] * stride_qh
        o_head = (kv_head * PACK + idx % PACK)[:, None] * stride_oh
    else:
        tok = tl.arange(0, BLOCK_M)
        kv_head = tl.program_id(0) // GROUP
        q_head = tl.program_id(0) * stride_qh
        o_head = tl.program_id(0) * stride_oh
    rows = m0 + tok
    row_mask = rows < q_len
    q_pos = first_pos + tok
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    row_off = (q_start + rows).to(tl.int64)
    q = tl.load(
        q_ptr + row_off[:, None] * stride_qt + q_head + d[None, :],
        mask=row_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    table = block_tables_ptr + b.to(tl.int64) * stride_bt
    m_i = tl.full([BLOCK_M * PACK], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M * PACK], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M * PACK, BLOCK_D], dtype=tl.float32)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(first_pos - window + 1, 0)
    # keys in [lo, first_pos] are visible to every row of the tile: no causal mask needed
    full_end = lo + (first_pos + 1 - lo) // BLOCK_N * BLOCK_N
    for n0 in range(lo, full_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, q_pos, k_cache_ptr, v_cache_ptr, table, kv_head, n0, full_end, window,
            scale_log2, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
            HEAD_DIM, BLOCK_D, BLOCK_SIZE, BLOCK_N, False, HAS_WINDOW, PRECISION,
        )  # fmt: skip
    kv_end = tl.minimum(first_pos + BLOCK_M, seq_len)
    for n0 in range(full_end, kv_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, q_pos, k_cache_ptr, v_cache_ptr, table, kv_head, n0, kv_end, window,
            scale_log2, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
            HEAD_DIM, BLOCK_D, BLOCK_SIZE, BLOCK_N, True, HAS_WINDOW, PRECISION,
        )  # fmt: skip
    # every valid row sees at least its own key, so l_i > 0 there; padded rows are not stored
    o = acc / tl.where(row_mask, l_i, 1.0)[:, None]
    dst = out_ptr + row_off[:, None] * stride_ot + o_head + d[None, :]
    tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])


def extend_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int,
    scale: float,
    sliding_window: int | None = None,
    config: ExtendConfig | None = None,
    first_seq: int = 0,
    tiles: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of ragged query chunks over their paged KV: ``q`` [T, Hq, D] -> [T, Hq, D]
    (written into ``out`` when given; rows the launch does not compute keep what they held).

    With ``tiles`` (int32 [N, 2] from ``extend_tiles``, built for the same ``config``, which must
    then be given) the grid is one program per entry and head group, whatever the chunk lengths:
    a launch that a CUDA graph can replay with other lengths. The entries name the sequences to
    compute (``first_seq`` is then not used).

    Only sequences ``first_seq..B-1`` are computed (the rows of earlier ones are left unwritten:
    a mixed step's leading decode rows, which the decode kernel serves).

    Sequence b owns query rows ``query_start_loc[b]:query_start_loc[b+1]`` (int32 [B+1]), which are
    its last positions, so its KV length is ``seq_lens[b]`` (int32 [B]); its pages are
    ``block_tables[b]``. Every chunk must be at most ``max_query_len`` long (the grid is sized
    from it; longer chunks would leave rows unwritten). A row at position p attends to keys
    ``(p - sliding_window, p]`` (all of ``[0, p]`` without a window). Rows of q past
    ``query_start_loc[B]`` are left unwritten.
    """
    _, num_kv_heads, head_dim = check_query(q, k_cache, v_cache)
    num_tokens, num_heads, _ = q.shape
    batch = seq_lens.shape[0] if seq_lens.dim() == 1 else -1
    check_index("seq_lens", seq_lens, (batch,), k_cache.device)
    check_index("block_tables", block_tables, (batch, -1), k_cache.device)
    check_index("query_start_loc", query_start_loc, (batch + 1,), k_cache.device)
    check_window(sliding_window)
    if config is not None:
        _check_config(config)
    if max_query_len < 0:
        raise ValueError(f"max_query_len must be >= 0, got {max_query_len}")
    if not 0 <= first_seq <= max(batch, 0):
        raise ValueError(f"first_seq must be in [0, {batch}], got {first_seq}")
    if tiles is not None:
        check_index("tiles", tiles, (-1, 2), k_cache.device)
        if not tiles.is_contiguous():
            raise ValueError(f"tiles must be contiguous, got strides {tiles.stride()}")
        if config is None:
            raise ValueError("tiles need the config they were built for (config=None given)")
        first_seq = 0
    out = output_like(q, out)
    if batch == first_seq or num_tokens == 0 or max_query_len == 0:
        return out
    group = num_heads // num_kv_heads
    if config is None:
        config = default_extend_config(max_query_len, head_dim, group, q.dtype)
    pack_heads = _pack_heads(config, group)
    block_m = config.block_m // pack_heads  # query positions per program
    if tiles is not None:
        grid = (num_heads // pack_heads, tiles.shape[0], 1)
    else:
        grid = (num_heads // pack_heads, triton.cdiv(max_query_len, block_m), batch - first_seq)
    _extend_kernel[grid](
        q,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        query_start_loc,
        out,
        scale * _LOG2E,
        sliding_window or 0,
        q.stride(0),
        q.stride(1),
        *k_cache.stride()[:3],
        *v_cache.stride()[:3],
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        first_seq,
        tiles if tiles is not None else seq_lens,  # unused without TILE_LIST
        GROUP=group,
        HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_SIZE=k_cache.shape[1],
        BLOCK_M=block_m,
        BLOCK_N=config.block_n,
        HAS_WINDOW=sliding_window is not None,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        PACK=pack_heads,
        TILE_LIST=tiles is not None,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return out


def extend_tile_positions(config: ExtendConfig, num_heads: int, num_kv_heads: int) -> int:
    """Query positions per program of ``config`` for this head layout (packed tiles hold a GQA
    group's heads, so fewer positions)."""
    return config.block_m // _pack_heads(config, num_heads // num_kv_heads)


def extend_tiles(query_lens: Sequence[int], first_seq: int, positions: int, capacity: int) -> torch.Tensor:
    """The (sequence, query tile) entries of sequences ``first_seq..`` for ``extend_attention``'s
    ``tiles`` (host int32 [capacity, 2]; ``positions`` from ``extend_tile_positions``): each
    sequence's latest tiles first (they see the most keys), the rest padding (-1, 0). At most
    ``cdiv(T, positions) + B`` entries for T query rows over B sequences."""
    out = np.empty((capacity, 2), dtype=np.int32)
    fill_extend_tiles(np.asarray(query_lens, dtype=np.int64), first_seq, positions, out)
    return torch.from_numpy(out)


def fill_extend_tiles(query_lens: np.ndarray, first_seq: int, positions: int, out: np.ndarray) -> None:
    """``extend_tiles`` written into ``out`` ([capacity, 2], any integer dtype; e.g. a view of a
    step's packed host inputs), with array ops."""
    if positions < 1:
        raise ValueError(f"positions must be >= 1, got {positions}")
    counts = -(-query_lens[first_seq:] // positions)
    total = int(counts.sum())
    if total > out.shape[0]:
        raise ValueError(f"{total} query tiles do not fit in {out.shape[0]} entries")
    ends = np.cumsum(counts)  # entry i of sequence s counts down from its last tile
    seqs = np.repeat(np.arange(first_seq, len(query_lens)), counts)
    out[:total, 0] = seqs
    out[:total, 1] = np.repeat(ends, counts) - 1 - np.arange(total)
    out[total:, 0] = -1
    out[total:, 1] = 0
