"""Paged decode attention (one query token per sequence) in Triton: flash-decoding with split KV.

Reference: ``attention_ref.paged_attention_ref`` on rows with one query each.

Each program owns one (sequence, KV head, split): it loads the query rows of every query head that
shares that KV head (GQA: K/V are read once for the whole group), walks its share of the
sequence's pages in tiles of ``block_n`` positions with an online softmax in fp32, and either
writes the normalized output (one split) or a partial output + log-sum-exp that a second small
kernel merges. The grid and every launch argument depend only on shapes and the number of SMs, so
a launch can be captured in a CUDA graph and replayed with other sequence lengths.

The grid is one axis, a sequence's programs adjacent (KV heads, then splits). Programs start in
grid order, so with ``order`` (the rows by descending length) the longest sequences start first
and the launch ends on short ones (longest-first scheduling) instead of on whichever long
sequence happened to come last.

``decode_attention_qkv`` is the same launch fed with the packed q/k/v projection: the programs also
do the q/k RMSNorm and RoPE, and store this step's K/V (the q/k norm + RoPE + store kernel of
``fused_ops`` folded in; used for small decode steps, see ``RunnerConfig.small_batch_decode_rope``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from rollout.kernels._checks import (
    check_index,
    check_kv_cache,
    check_query,
    check_slots,
    check_window,
    output_like,
    pdl_usable,
)
from rollout.kernels.fused_ops import check_qk

_LOG2E = 1.4426950408889634
# Enough resident programs to keep the memory system busy: splits are added until the grid has
# about this many programs per SM. Chosen, not tuned: on the H100 it splits batch 1 and 8 (which
# need it: 4-6x faster at 4K) and leaves batch >= 128 whole (see kernels/attention_notes.md).
_PROGRAMS_PER_SM = 4
_MAX_SPLITS = 32
_CPU_SMS = 8  # interpreter runs: pretend a small GPU so that tests exercise the split path


@dataclass(frozen=True)
class DecodeConfig:
    """Launch parameters of the decode kernel (the launcher picks them when none is given)."""

    num_splits: int  # KV splits per (sequence, KV head); 1 skips the merge kernel
    block_n: int = 64  # positions per tile
    # tl.dot on [group padded to 16, D] tiles (tensor cores), else broadcast-multiply-reduce on
    # CUDA cores. The dot path was 2.4x faster even at group 2 on the H100 (the reductions
    # reach ~40% of copy bandwidth, the dot path ~100% at batch 256 x 4K).
    use_dot: bool = True
    num_warps: int = 4
    num_stages: int = 2


def _split_chunk(group: int, head_dim: int, num_splits: int) -> int:
    """Splits the fused merge loads at once: [group, chunk, head_dim] fp32 partials, at most 4K
    values (registers: 32 per thread at 4 warps)."""
    p2 = triton.next_power_of_2
    return max(1, min(p2(num_splits), 4096 // (p2(group) * p2(head_dim))))


@functools.cache
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def default_decode_config(
    batch: int, num_kv_heads: int, device: torch.device, head_dim: int = 128, itemsize: int = 2
) -> DecodeConfig:
    """Heuristic config from shapes and the device alone (never from sequence lengths);
    ``head_dim`` and ``itemsize`` (the cache's bytes per element) bound the tile's shared memory."""
    if device.type == "cuda":  # looked up once per device: eager mixed steps call this per layer
        num_sms = _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
    else:
        num_sms = _CPU_SMS
    programs = max(batch * num_kv_heads, 1)
    num_splits = max(1, min(_MAX_SPLITS, math.ceil(_PROGRAMS_PER_SM * num_sms / programs)))
    # At batch >= 32 tiles of 64 and 128 both reach ~90-100% of copy bandwidth. Small, split
    # batches are latency-bound and were measured with 128 (batch 1 x 4K: 14 us in a CUDA graph);
    # eager timings of 64 vs 128 there disagreed between runs (20-30 us, noise): unsettled.
    # Unsplit, a third pipeline stage was faster on every H200 case measured (batch 256 x 1K
    # 276 -> 254 us, W1-like ragged batches 1.5-3%) and within 1-2% either way on the H100.
    if num_splits > 1:
        # 128-position K/V tiles of 1,024-byte rows (fp32 x 256) and their second stage need 286,784
        # bytes of shared memory, more than a Hopper block may have (232,448): 64 there (151,616)
        return DecodeConfig(num_splits=num_splits, block_n=128 if head_dim * itemsize <= 512 else 64)
    return DecodeConfig(num_splits=1, block_n=64, num_stages=3)


@triton.jit
def _attend_pages(
    acc, m_i, l_i, q, table, kv_head, start, end, k_cache_ptr, v_cache_ptr, scale_log2,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_DOT: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Online softmax (fp32, log2 domain) of the query rows ``q`` [rows, BLOCK_D] of one KV head
    over positions [start, end) of the pages listed at ``table``, in tiles of BLOCK_N positions:
    the running (acc, max, sum) updated."""
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    for n0 in range(start, end, BLOCK_N):
        valid, page, in_page = _tile_pages(table, n0, end, BLOCK_SIZE, BLOCK_N)
        kv_mask = valid[:, None] & d_mask[None, :]
        k_rows = k_cache_ptr + page * stride_kb + in_page * stride_ks + kv_head * stride_kh
        k = tl.load(k_rows[:, None] + d[None, :], mask=kv_mask, other=0.0)
        p, alpha, m_i, l_i = _scores_tile(m_i, l_i, q, k, valid, scale_log2, USE_DOT, PRECISION)
        v_rows = v_cache_ptr + page * stride_vb + in_page * stride_vs + kv_head * stride_vh
        v = tl.load(v_rows[:, None] + d[None, :], mask=kv_mask, other=0.0)
        acc = _values_tile(acc, alpha, p, v, USE_DOT, PRECISION)
    return acc, m_i, l_i


@triton.jit
def _tile_pages(table, n0, end, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Positions [n0, n0 + BLOCK_N) in the pages listed at ``table``: which are before ``end``, and
    their page and place in it."""
    pos = n0 + tl.arange(0, BLOCK_N)
    valid = pos < end
    page = tl.load(table + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    return valid, page, pos % BLOCK_SIZE


@triton.jit
def _scores_tile(m_i, l_i, q, k, valid, scale_log2, USE_DOT: tl.constexpr, PRECISION: tl.constexpr):
    """One K tile's scores (log2 domain, -inf where not ``valid``) into the running max and sum:
    (p, the old sum's rescale alpha, the new max, the new sum)."""
    if USE_DOT:
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    else:
        qk = tl.sum(q[:, None, :].to(tl.float32) * k[None, :, :].to(tl.float32), axis=2)
    qk = tl.where(valid[None, :], qk * scale_log2, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, axis=1))
    p = tl.exp2(qk - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, axis=1)


@triton.jit
def _values_tile(acc, alpha, p, v, USE_DOT: tl.constexpr, PRECISION: tl.constexpr):
    """The running output rescaled by ``alpha`` plus ``p`` @ the V tile."""
    if USE_DOT:
        pv = tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    else:
        pv = tl.sum(p[:, :, None] * v[None, :, :].to(tl.float32), axis=1)
    return acc * alpha[:, None] + pv


@triton.jit
def _store_partial(part_out_ptr, part_lse_ptr, acc, m_i, l_i, row, mask, HEAD_DIM: tl.constexpr,
                   BLOCK_D: tl.constexpr):  # fmt: skip
    """A split's normalized partial output (fp32 rows of HEAD_DIM at ``row``) and its log2-sum-exp.
    Rows that saw no key (padding rows, seq_len 0, and empty splits: at batch 1 x ctx 1K, 24 of the
    32 splits, whose shares are whole 128-position tiles) store only their -inf, which tells the
    merge to skip their output rows."""
    d = tl.arange(0, BLOCK_D)
    has_keys = l_i > 0.0
    o = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    tl.store(
        part_out_ptr + row[:, None] * HEAD_DIM + d[None, :],
        o,
        mask=(mask & has_keys)[:, None] & (d < HEAD_DIM)[None, :],
    )
    lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
    tl.store(part_lse_ptr + row, lse, mask=mask)


@triton.jit
def _norm_rope(
    src, rows, row_mask, w_ptr, cos, sin, eps,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_NORM: tl.constexpr,
):  # fmt: skip
    """Rows ``src + rows * HEAD_DIM`` of a packed projection, each head RMS-normalized with ``w_ptr``
    (``HAS_NORM``, Qwen3) and rotated (RoPE, rotate-half) by ``cos``/``sin`` [1, BLOCK_D] (fp32,
    element d holding the angle of d % HALF): [rows, BLOCK_D] in the projection's dtype, with the
    roundings of ``fused_ops._qk_norm_rope_kernel`` (op by op in the input dtype, as torch)."""
    d = tl.arange(0, BLOCK_D)
    half: tl.constexpr = HEAD_DIM // 2
    swap = (d + half) % HEAD_DIM  # x[d + HALF] for the first half, x[d - HALF] for the second
    mask = row_mask[:, None] & (d < HEAD_DIM)[None, :]
    base = src + rows[:, None] * HEAD_DIM
    x = tl.load(base + d[None, :], mask=mask, other=0.0)
    xs = tl.load(base + swap[None, :], mask=mask, other=0.0)
    dt = x.dtype
    if HAS_NORM:
        h, hs = x.to(tl.float32), xs.to(tl.float32)
        inv = tl.rsqrt(tl.sum(h * h, axis=1) / HEAD_DIM + eps)[:, None]
        w = tl.load(w_ptr + d, mask=d < HEAD_DIM, other=0.0).to(tl.float32)[None, :]
        ws = tl.load(w_ptr + swap, mask=d < HEAD_DIM, other=0.0).to(tl.float32)[None, :]
        x = (w * (h * inv).to(dt).to(tl.float32)).to(dt)
        xs = (ws * (hs * inv).to(dt).to(tl.float32)).to(dt)
    sign = tl.where(d < half, -1.0, 1.0)[None, :]
    rot = (x.to(tl.float32) * cos).to(dt).to(tl.float32)
    rot += sign * (xs.to(tl.float32) * sin).to(dt).to(tl.float32)
    return rot.to(dt)


@triton.jit
def _step_kv(
    k_src, kv_head, kw_ptr, cos, sin, eps, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, HAS_NORM: tl.constexpr,
):  # fmt: skip
    """This step's k (normalized and rotated, ``_norm_rope``) and raw v of ``kv_head`` from a packed
    projection row whose k columns start at ``k_src``: [1, BLOCK_D] each, the projection's dtype."""
    one = tl.arange(0, 1)
    d = tl.arange(0, BLOCK_D)
    src = k_src + kv_head * HEAD_DIM
    k = _norm_rope(src, one, one < 1, kw_ptr, cos, sin, eps, HEAD_DIM, BLOCK_D, HAS_NORM)
    v = tl.load(src + NUM_KV_HEADS * HEAD_DIM + d[None, :], mask=(d < HEAD_DIM)[None, :], other=0.0)
    return k, v


@triton.jit
def _merge_group(
    part_out_ptr, part_lse_ptr, out_ptr, b, kv_head, num_splits, stride_ob, stride_oh,
    GROUP: tl.constexpr, GROUP_P2: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, SPLITS_PAD: tl.constexpr, SPLIT_CHUNK: tl.constexpr,
):  # fmt: skip
    """Merge the splits' partials of one (sequence, KV head), every query head of the group, in
    chunks of SPLIT_CHUNK splits: weights exp2(lse - max lse), all 0 for a padding row (every
    split empty). An empty split's output row is neither stored nor read (its lse is -inf). The
    partials come from other programs: loaded with .cg (L2), never from this SM's L1."""
    g = tl.arange(0, GROUP_P2)
    g_mask = g < GROUP
    heads = kv_head * GROUP + g
    base = (b * NUM_KV_HEADS * GROUP + heads).to(tl.int64) * num_splits
    s = tl.arange(0, SPLITS_PAD)
    lse = tl.load(
        part_lse_ptr + base[:, None] + s[None, :],
        mask=g_mask[:, None] & (s < num_splits)[None, :],
        other=float("-inf"),
        cache_modifier=".cg",
    )
    m = tl.max(lse, axis=1)
    m = tl.where(m == float("-inf"), 0.0, m)  # every split empty (seq_len 0): weights all 0
    denom = tl.sum(tl.exp2(lse - m[:, None]), axis=1)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    c = tl.arange(0, SPLIT_CHUNK)
    acc = tl.zeros([GROUP_P2, BLOCK_D], dtype=tl.float32)
    for s0 in range(0, num_splits, SPLIT_CHUNK):
        sj = s0 + c
        gs_mask = g_mask[:, None] & (sj < num_splits)[None, :]
        lse_j = tl.load(
            part_lse_ptr + base[:, None] + sj[None, :],
            mask=gs_mask,
            other=float("-inf"),
            cache_modifier=".cg",
        )
        w = tl.exp2(lse_j - m[:, None])
        rows = base[:, None, None] + sj[None, :, None]
        live = gs_mask & (lse_j > float("-inf"))  # empty splits' rows were not stored
        part = tl.load(
            part_out_ptr + rows * HEAD_DIM + d[None, None, :],
            mask=live[:, :, None] & d_mask[None, None, :],
            other=0.0,
            cache_modifier=".cg",
        )
        acc += tl.sum(w[:, :, None] * part, axis=1)
    o = acc / tl.where(denom > 0.0, denom, 1.0)[:, None]
    dst = out_ptr + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + d[None, :]
    tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])


# Not specialized: values that change between steps (see kernels/sampling.py).
@triton.jit(do_not_specialize=["num_splits", "stride_bt"])
def _decode_split_kernel(
    order_ptr,
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    out_ptr,
    part_out_ptr,
    part_lse_ptr,
    counters_ptr,
    pos_ptr,
    rope_ptr,
    qw_ptr,
    kw_ptr,
    slot_ptr,
    stride_rope,
    k_col,
    eps,
    scale_log2,
    window,
    num_splits,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_bt,
    stride_ob,
    stride_oh,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    USE_DOT: tl.constexpr,
    SPLIT: tl.constexpr,
    PRECISION: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HAS_ORDER: tl.constexpr,
    FUSED_MERGE: tl.constexpr,  # the last split program of each (sequence, KV head) merges them
    GROUP_P2: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
    SPLIT_CHUNK: tl.constexpr,
    LAUNCH_DEPENDENTS: tl.constexpr,
    WAIT: tl.constexpr,  # launched as a programmatic dependent (decode_attention's pdl)
    ROPE: tl.constexpr,  # q_ptr is the packed projection: norm + RoPE here, this step's K/V stored
    HAS_NORM: tl.constexpr,
    PRELOAD: tl.constexpr,  # (with ROPE) the first K/V tile loaded before the wait
):
    pid = tl.program_id(0)
    split = pid % num_splits
    kv_head = (pid // num_splits) % NUM_KV_HEADS
    b = pid // (num_splits * NUM_KV_HEADS)
    if HAS_ORDER:
        b = tl.load(order_ptr + b)
    seq_len = tl.load(seq_lens_ptr + b)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(seq_len - window, 0)
    # Each split covers a BLOCK_N-aligned share of [lo, seq_len); trailing splits may be empty.
    per_split = tl.cdiv(tl.cdiv(seq_len - lo, num_splits), BLOCK_N) * BLOCK_N
    start = lo + split * per_split
    end = tl.minimum(start + per_split, seq_len)
    d = tl.arange(0, BLOCK_D)
    if ROPE:  # step inputs and constants, like the order and lengths: read before the wait
        pos = tl.load(pos_ptr + b).to(tl.int64)
        slot = tl.load(slot_ptr + b).to(tl.int64)
        angle = pos * stride_rope + d % (HEAD_DIM // 2)
        dt = out_ptr.dtype.element_ty  # HF casts cos/sin to the activations' dtype first
        cos = tl.load(rope_ptr + angle, mask=d < HEAD_DIM, other=0.0).to(dt).to(tl.float32)[None, :]
        sin = tl.load(rope_ptr + angle + HEAD_DIM // 2, mask=d < HEAD_DIM, other=0.0)
        sin = sin.to(dt).to(tl.float32)[None, :]
    table = block_tables_ptr + b.to(tl.int64) * stride_bt
    if PRELOAD:  # the first tile's K/V: every position before this step's is in the cache from earlier
        # steps (this launch stores the new one; no launch before it in the step writes the cache),
        # so their HBM reads overlap the launch before. The new position's row is replaced below.
        valid0, page0, in0 = _tile_pages(table, start, end, BLOCK_SIZE, BLOCK_N)
        mask0 = valid0[:, None] & (d < HEAD_DIM)[None, :]
        k_rows0 = k_cache_ptr + page0 * stride_kb + in0 * stride_ks + kv_head * stride_kh
        v_rows0 = v_cache_ptr + page0 * stride_vb + in0 * stride_vs + kv_head * stride_vh
        k0 = tl.load(k_rows0[:, None] + d[None, :], mask=mask0, other=0.0)
        v0 = tl.load(v_rows0[:, None] + d[None, :], mask=mask0, other=0.0)
    if WAIT:  # the order and lengths above are step inputs; q and this step's K/V are not
        gdc_wait()
    if LAUNCH_DEPENDENTS:  # see _merge_splits_kernel
        gdc_launch_dependents()

    g = tl.arange(0, GROUP_PAD)
    heads = kv_head * GROUP + g
    head_mask = g < GROUP
    d_mask = d < HEAD_DIM
    row_ptr = q_ptr + b.to(tl.int64) * stride_qb
    if ROPE:
        q = _norm_rope(row_ptr, heads, head_mask, qw_ptr, cos, sin, eps, HEAD_DIM, BLOCK_D, HAS_NORM)
        # The program whose share ends at this step's position stores its K/V (rotated k, raw v)
        # and reads them back from the cache in its last tile: the barrier orders every thread's
        # stores before those loads. Padding rows (slot -1, no keys) store nothing.
        if PRELOAD:  # this step's k/v, in place of the preloaded tile's stale row at the new position
            k_new, v_new = _step_kv(row_ptr + k_col, kv_head, kw_ptr, cos, sin, eps, NUM_KV_HEADS, HEAD_DIM,
                                    BLOCK_D, HAS_NORM)  # fmt: skip
            new_row = ((start + tl.arange(0, BLOCK_N) == seq_len - 1) & (slot >= 0))[:, None]
            k0 = tl.where(new_row, k_new.to(k_cache_ptr.dtype.element_ty), k0)
            v0 = tl.where(new_row, v_new.to(v_cache_ptr.dtype.element_ty), v0)
        if (end == seq_len) & (start < end) & (slot >= 0):
            if PRELOAD:
                k, v = k_new, v_new
            else:
                k, v = _step_kv(row_ptr + k_col, kv_head, kw_ptr, cos, sin, eps, NUM_KV_HEADS, HEAD_DIM,
                                BLOCK_D, HAS_NORM)  # fmt: skip
            page, in_page = slot // BLOCK_SIZE, slot % BLOCK_SIZE
            k_dst = k_cache_ptr + page * stride_kb + in_page * stride_ks + kv_head * stride_kh
            v_dst = v_cache_ptr + page * stride_vb + in_page * stride_vs + kv_head * stride_vh
            tl.store(k_dst + d[None, :], k.to(k_cache_ptr.dtype.element_ty), mask=d_mask[None, :])
            tl.store(v_dst + d[None, :], v.to(v_cache_ptr.dtype.element_ty), mask=d_mask[None, :])
            tl.debug_barrier()
    else:
        q = tl.load(
            row_ptr + heads[:, None] * stride_qh + d[None, :],
            mask=head_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
    # -1e30 rather than -inf keeps exp2(m_old - m_new) finite while every score so far is masked.
    m_i = tl.full([GROUP_PAD], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, BLOCK_D], dtype=tl.float32)
    first = start
    if PRELOAD:  # the first tile as _attend_pages' first iteration would do it
        p, alpha, m_i, l_i = _scores_tile(m_i, l_i, q, k0, valid0, scale_log2, USE_DOT, PRECISION)
        acc = _values_tile(acc, alpha, p, v0, USE_DOT, PRECISION)
        first = start + BLOCK_N
    acc, m_i, l_i = _attend_pages(
        acc, m_i, l_i, q, table, kv_head, first, end, k_cache_ptr, v_cache_ptr, scale_log2, stride_kb,
        stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, HEAD_DIM, BLOCK_D, BLOCK_SIZE, BLOCK_N,
        USE_DOT, PRECISION,
    )  # fmt: skip
    if SPLIT:
        row = (b * NUM_KV_HEADS * GROUP + heads).to(tl.int64) * num_splits + split
        _store_partial(part_out_ptr, part_lse_ptr, acc, m_i, l_i, row, head_mask, HEAD_DIM, BLOCK_D)
        if FUSED_MERGE:
            # Count this split done; the program that completes the count merges. The barrier
            # orders every thread's partial stores before the counting thread's release.
            tl.debug_barrier()
            counter = counters_ptr + b * NUM_KV_HEADS + kv_head
            done = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
            if done == num_splits - 1:
                tl.store(counter, 0)  # zero again for the next launch
                _merge_group(
                    part_out_ptr, part_lse_ptr, out_ptr, b, kv_head, num_splits, stride_ob, stride_oh,
                    GROUP, GROUP_P2, NUM_KV_HEADS, HEAD_DIM, BLOCK_D, SPLITS_PAD, SPLIT_CHUNK,
                )  # fmt: skip
    else:
        has_keys = l_i > 0.0  # false for padding rows (seq_len 0)
        o = tl.where(has_keys[:, None], acc / tl.where(has_keys, l_i, 1.0)[:, None], 0.0)
        dst = out_ptr + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + d[None, :]
        tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=head_mask[:, None] & d_mask[None, :])


@triton.jit(do_not_specialize=["num_splits"])
def _merge_splits_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, num_splits, stride_ob, stride_oh,
    GROUP: tl.constexpr, GROUP_P2: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, SPLITS_PAD: tl.constexpr, SPLIT_CHUNK: tl.constexpr,
    LAUNCH_DEPENDENTS: tl.constexpr, WAIT: tl.constexpr,
):  # fmt: skip
    """The splits' merge as a launch of its own: one program per (sequence, KV head)."""
    if WAIT:  # launched as a programmatic dependent of the split launch
        gdc_wait()
    if LAUNCH_DEPENDENTS:  # a programmatic dependent after it (the o projection GEMV) may start
        gdc_launch_dependents()
    _merge_group(
        part_out_ptr, part_lse_ptr, out_ptr, tl.program_id(0), tl.program_id(1), num_splits, stride_ob,
        stride_oh, GROUP, GROUP_P2, NUM_KV_HEADS, HEAD_DIM, BLOCK_D, SPLITS_PAD, SPLIT_CHUNK,
    )  # fmt: skip


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    config: DecodeConfig | None = None,
    out: torch.Tensor | None = None,
    order: torch.Tensor | None = None,
    counters: torch.Tensor | None = None,
    pdl: bool = False,
) -> torch.Tensor:
    """Attention of one query token per sequence over its paged KV: ``q`` [B, Hq, D] -> [B, Hq, D]
    (written into ``out`` when given, e.g. the leading rows of a mixed step's output).

    Sequence b attends to positions ``[max(0, seq_lens[b] - sliding_window), seq_lens[b])`` of its
    pages ``block_tables[b]`` (int32 [B, max_blocks]); the query is its last position, whose K/V
    are already stored. Rows with ``seq_lens[b] == 0`` (padding) produce zeros and read nothing.
    Head h of q uses KV head ``h // (Hq // Hkv)``. Graph-safe: nothing here reads device values
    on the host.

    ``order`` (int32 [B], optional) is a permutation of the rows, the order in which sequences'
    programs start: longest first (``models.layers.attention.decode_order``) shortens the tail of
    ragged batches. The output is the same in any order.

    ``counters`` (int32, at least B * Hkv entries, all zero; optional) lets a split launch merge
    its splits itself: the last program to finish a (sequence, KV head) merges them and zeroes
    its counter again, so no merge kernel follows (one launch fewer per layer at small batches).
    The buffer must outlive the launch (CUDA graphs: a static buffer) and serve one launch at a
    time.

    ``pdl``: launch as programmatic dependents (Hopper and later, ignored elsewhere): the split
    launch reads ``order`` and ``seq_lens`` before it waits for the launch before it (so no
    launch of the chain may write them: a decode step's are copied in before its first kernel),
    and a merge launch waits for the split launch. Either lets the launch after it start once it
    has waited (plain launches: at once).
    """
    _, num_kv_heads, head_dim = check_query(q, k_cache, v_cache)
    out = output_like(q, out)
    _launch(q, q.stride(0), q.stride(1), q.shape[1], num_kv_heads, head_dim, k_cache, v_cache,
            block_tables, seq_lens, scale, sliding_window, config, out, order, counters, pdl,
            None)  # fmt: skip
    return out


@dataclass(frozen=True)
class _Rope:
    """What ``decode_attention_qkv``'s programs need to build q and this step's K/V themselves."""

    positions: torch.Tensor
    cos_sin_cache: torch.Tensor
    slot_mapping: torch.Tensor
    q_weight: torch.Tensor | None
    k_weight: torch.Tensor | None
    eps: float
    preload: bool


def decode_attention_qkv(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    num_heads: int,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    slot_mapping: torch.Tensor,
    scale: float,
    q_weight: torch.Tensor | None = None,
    k_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    sliding_window: int | None = None,
    config: DecodeConfig | None = None,
    order: torch.Tensor | None = None,
    counters: torch.Tensor | None = None,
    pdl: bool = False,
    preload: bool = False,
) -> torch.Tensor:
    """``qk_norm_rope_store`` and ``decode_attention`` in one launch, for a decode step: from the
    packed projection ``qkv`` [B, (Hq + 2 Hkv) * D] (one row per sequence) to the attention output
    [B, Hq, D] (a new tensor).

    Each program q/k-normalizes (with ``q_weight``/``k_weight`` when given, Qwen3) and rotates its
    query heads at ``positions[b]`` (``cos_sin_cache`` [max_pos, D]: cos then sin per row); the
    program whose share of the sequence ends at its last position also rotates that position's k,
    stores it and the raw v at ``slot_mapping[b]`` (-1 skips a padding row), and then attends over
    them like the rest, so the caller's slots must be the last position of each row's pages (as a
    decode step's are). The result equals the two-launch path up to the summation order of the
    q/k norms. ``pdl``: as ``decode_attention``'s; the positions, slots and cos/sin rows are read
    before the wait, like the lengths. ``preload``: each program also loads its first K/V tile
    before the wait (every position but this step's is in the cache already; the new one's row is
    replaced by the k/v it computes), so that tile's HBM reads overlap the launch before; the same
    results.
    """
    _, _, num_kv_heads, head_dim = check_kv_cache(k_cache, v_cache)
    check_qk(qkv, positions, cos_sin_cache, num_heads, num_kv_heads, head_dim, q_weight, k_weight, True)
    batch = qkv.shape[0]
    # its q columns as decode_attention's q: the cache's dtype and device, whole GQA groups
    check_query(qkv[:, : num_heads * head_dim].unflatten(1, (num_heads, head_dim)), k_cache, v_cache)
    check_slots(slot_mapping, batch, qkv.device)
    out = torch.empty((batch, num_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    if preload and config is None:  # the first tile is held in registers across the wait: 64
        # positions (143 registers on sm_90), not the split default's 128 (252: 2 programs per SM)
        default = default_decode_config(batch, num_kv_heads, qkv.device, head_dim, k_cache.element_size())
        config = replace(default, block_n=64)
    rope = _Rope(positions, cos_sin_cache, slot_mapping, q_weight, k_weight, eps, preload)
    _launch(qkv, qkv.stride(0), head_dim, num_heads, num_kv_heads, head_dim, k_cache, v_cache,
            block_tables, seq_lens, scale, sliding_window, config, out, order, counters, pdl,
            rope)  # fmt: skip
    return out


def _launch(
    q: torch.Tensor,
    stride_qb: int,
    stride_qh: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None,
    config: DecodeConfig | None,
    out: torch.Tensor,
    order: torch.Tensor | None,
    counters: torch.Tensor | None,
    pdl: bool,
    rope: _Rope | None,
) -> None:
    """The split launch (and the merge launch after it, unless merged in the kernel) for ``out``'s
    rows; ``q`` holds the queries at ``stride_qb``/``stride_qh``, or the packed projection (rope)."""
    batch = out.shape[0]
    check_index("block_tables", block_tables, (batch, -1), k_cache.device)
    check_index("seq_lens", seq_lens, (batch,), k_cache.device)
    check_window(sliding_window)
    if order is not None:
        check_index("order", order, (batch,), k_cache.device)
    if counters is not None:
        check_index("counters", counters, (-1,), k_cache.device)
        if counters.numel() < batch * num_kv_heads:
            raise ValueError(
                f"counters has {counters.numel()} entries, fewer than {batch} rows x {num_kv_heads} KV heads"
            )
    group = num_heads // num_kv_heads
    if config is None:
        config = default_decode_config(batch, num_kv_heads, q.device, head_dim, k_cache.element_size())
    if config.num_splits < 1 or config.block_n < 16 or config.block_n & (config.block_n - 1):
        raise ValueError(f"bad decode config {config}")
    if batch == 0:
        return
    rope_args = (seq_lens,) * 5  # unused without ROPE
    if rope is not None:
        weights = (rope.q_weight, rope.k_weight) if rope.q_weight is not None else (q, q)
        rope_args = (rope.positions, rope.cos_sin_cache, *weights, rope.slot_mapping)
    split = config.num_splits > 1
    fused_merge = split and counters is not None
    # The attention's launches let a programmatic dependent after them (kernels/gemv.py) start
    # early; no effect on plain launches.
    launch_dependents = pdl_usable(_decode_split_kernel, q.device)
    pdl = pdl and launch_dependents
    launch = {"launch_pdl": True} if pdl else {}
    merge_args = dict(  # the merge's constexprs (in the split kernel's last program, or its own launch)
        GROUP=group,
        GROUP_P2=triton.next_power_of_2(group),
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim),
        SPLITS_PAD=triton.next_power_of_2(config.num_splits),
        SPLIT_CHUNK=_split_chunk(group, head_dim, config.num_splits),
    )
    if split:
        part_out = torch.empty(
            batch, num_heads, config.num_splits, head_dim, dtype=torch.float32, device=q.device
        )
        part_lse = torch.empty(batch, num_heads, config.num_splits, dtype=torch.float32, device=q.device)
    else:  # unused: the kernel writes the final output directly
        part_out = part_lse = out
    _decode_split_kernel[(batch * num_kv_heads * config.num_splits,)](
        order if order is not None else seq_lens,
        q,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        out,
        part_out,
        part_lse,
        counters if counters is not None else seq_lens,  # unused without FUSED_MERGE
        *rope_args,
        rope.cos_sin_cache.stride(0) if rope is not None else 0,
        num_heads * head_dim,  # k's first column in the packed projection
        rope.eps if rope is not None else 0.0,
        scale * _LOG2E,
        sliding_window or 0,
        config.num_splits,
        stride_qb,
        stride_qh,
        *k_cache.stride()[:3],
        *v_cache.stride()[:3],
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        GROUP=group,
        # tl.dot needs at least 16 rows; the padded query rows are masked (zeros, never stored)
        GROUP_PAD=max(16, triton.next_power_of_2(group)) if config.use_dot else triton.next_power_of_2(group),
        HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_SIZE=k_cache.shape[1],
        BLOCK_N=config.block_n,
        HAS_WINDOW=sliding_window is not None,
        USE_DOT=config.use_dot,
        SPLIT=split,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        NUM_KV_HEADS=num_kv_heads,
        HAS_ORDER=order is not None,
        FUSED_MERGE=fused_merge,
        GROUP_P2=merge_args["GROUP_P2"],
        SPLITS_PAD=merge_args["SPLITS_PAD"],
        SPLIT_CHUNK=merge_args["SPLIT_CHUNK"],
        LAUNCH_DEPENDENTS=launch_dependents,
        WAIT=pdl,
        ROPE=rope is not None,
        HAS_NORM=rope is not None and rope.q_weight is not None,
        PRELOAD=rope is not None and rope.preload,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        **launch,
    )
    if split and not fused_merge:
        _merge_splits_kernel[(batch, num_kv_heads)](
            part_out,
            part_lse,
            out,
            config.num_splits,
            out.stride(0),
            out.stride(1),
            **merge_args,
            LAUNCH_DEPENDENTS=launch_dependents,
            WAIT=pdl,
            num_warps=4,
            **launch,
        )
