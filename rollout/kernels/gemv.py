"""Small-batch projections with their neighbours fused in: ``x [M <= 16, K] @ w.T`` where each
program owns a block of output columns and streams its rows of ``w`` once, with an optional
RMSNorm (+ residual add) prologue and SiLU-and-mul epilogue.

A decode step of a few sequences is a chain of latency-bound kernels (batch 1 on Qwen3-0.6B: 327
launches in 1.5 ms against a 0.28 ms weight-read floor). Per layer the projections here replace
seven launches (add+RMSNorm, qkv GEMM, o GEMM, add+RMSNorm, gate/up GEMM, SiLU-and-mul, down GEMM)
with four. Every program recomputes the norm of its rows (x is a few KB; program 0 stores the new
residual), and a gate/up program reads the gate and the up rows of its columns together.

Numerics follow the layers they replace (``RMSNorm``: statistics in fp32, the normalized value
rounded to the input dtype before the weight multiply; ``SiluAndMul``: silu rounded to the dtype,
then the product): only the GEMM's summation order differs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from rollout.kernels._checks import pdl_usable
from rollout.kernels.fused_ops import rms_norm_ref, silu_and_mul_ref

MAX_ROWS = 16  # rows (sequences) one launch serves: one tensor-core tile


@dataclass(frozen=True)
class GemvTiling:
    """How a small-batch GEMV reads its weights.

    Each program streams the weight rows of ``BLOCK_N`` output columns over K in tiles of about
    ``tile_elems`` elements. By default it loads a tile, computes, then loads the next (a program
    whose weights are exactly two tiles loads both before it waits for its input). Triton does not
    software-pipeline the plain loads of such a loop, so a program has one tile in flight: at one
    row the down projection of Qwen3-0.6B (128 programs x 8 KB) keeps ~1 MB of its 6 MB in flight,
    far from what HBM needs to run at its bandwidth. Two ways to put more in flight:

    - ``whole_k``: a program takes all of K as one tile (``BLOCK_K`` = K rounded up to a power of
      two, ``BLOCK_N`` = ``tile_elems`` / that, at most 16, at every row count: the weight bytes in
      flight do not shrink as rows are added), so it issues all its weight loads before it waits
      for its input. Only where that leaves at least 2 columns: K up to ``tile_elems`` / 2 (4,096
      by default), else the default tiling. Every program re-reads x (and the residual and norm
      weight) over all of K. The sum over K runs in one tile instead of several: results differ
      from the default in rounding. At 5-16 rows the GEMV takes 16-row tensor-core tiles (128-wide
      K tiles, looped) with either setting.
    - ``stages`` > 0: the loop runs as ``tl.range(num_stages=stages)``, which pipelines plain
      loads too. Same results as the default.

    H200, the 28-layer GEMV chain of Qwen3-0.6B in one CUDA graph (``python -m
    rollout.benchmarks.gemv_chain``), us per layer: 1 row default 34.5, stages 3 32.6, whole_k 15.8
    (stop 27; cuBLAS GEMMs alone, no norms: 29.0). With whole-K columns kept at every row count
    (stop 28; default / whole_k / whole_k with 16K or 4K elements / cuBLAS): 2 rows 47.2 / 22.2 /
    23.9 / 43.9 / 27.9; 3 rows 115.9 / 27.9 / 29.6 / 93.9 / 26.7; 4 rows 116.2 / 28.0 / 30.2 / 94.1
    / 26.3 (8 warps: 17.9 at one row, 36.3 at four; 2 warps 15.6 at one row). ``whole_k`` is the
    engine's default: batch-1 step 1.19 -> 0.90 ms, batch 2 / 4 1.65 -> 1.16 / 1.42 ms against
    cuBLAS with the norm and SiLU kernels between (the chain saves those launches)."""

    whole_k: bool = False
    stages: int = 0  # 0: a plain loop
    tile_elems: int = 8192  # weight elements per program and tile (16 KB of bf16)
    num_warps: int = 4

    def __post_init__(self) -> None:
        if self.stages < 0 or self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"stages must be >= 0 and num_warps a power of two <= 16, got {self}")
        if self.tile_elems < 256 or self.tile_elems & (self.tile_elems - 1):
            raise ValueError(f"tile_elems must be a power of two >= 256, got {self.tile_elems}")

    def blocks(self, m: int, n: int, k: int, silu_mul: bool) -> tuple[bool, int, int, int, bool]:
        """(use_dot, BLOCK_M, BLOCK_N, BLOCK_K, preload_two) for an [m, k] x [k, n] GEMV."""
        if m > 4:  # a 16-row tensor-core tile; below, a broadcast multiply-sum
            return True, 16, (32 if n >= 4096 else 16), 128, False
        block_m = triton.next_power_of_2(m)
        whole = triton.next_power_of_2(k)
        if self.whole_k and whole * 2 <= self.tile_elems:  # at least 2 columns a program
            return False, block_m, min(16, self.tile_elems // whole), whole, False
        block_n = 16 if n >= 2048 else 8
        block_k = max(64, min(512, self.tile_elems // (block_m * block_n)))
        # A program whose weights are two tiles (the qkv projection and the LM head of Qwen3-0.6B
        # at one row) loads both before it waits for its input
        return False, block_m, block_n, block_k, not silu_mul and k == 2 * block_k


@triton.jit
def _activation(
    x_ptr, res_ptr, g_ptr, rows, row_ok, ks, k_ok, K, rstd, NORM: tl.constexpr, ADD_RES: tl.constexpr
):
    """One [BLOCK_M, BLOCK_K] tile of the GEMV's input: x, or RMSNorm(x (+ residual)) given rstd."""
    mask = row_ok[:, None] & k_ok[None, :]
    a = tl.load(x_ptr + rows[:, None] * K + ks[None, :], mask=mask, other=0.0)
    if NORM:
        if ADD_RES:
            r = tl.load(res_ptr + rows[:, None] * K + ks[None, :], mask=mask, other=0.0)
            a = (a.to(tl.float32) + r.to(tl.float32)).to(a.dtype)  # rounded like torch's x + r
        g = tl.load(g_ptr + ks, mask=k_ok, other=0.0)
        normed = (a.to(tl.float32) * rstd[:, None]).to(a.dtype)
        a = (g.to(tl.float32)[None, :] * normed.to(tl.float32)).to(a.dtype)
    return a


@triton.jit
def _weight_tile(w_ptr, cols, col_ok, N, ks, k_ok, K, SILU_MUL: tl.constexpr):
    """Rows ``cols`` of ``w`` over columns ``ks``, and with SILU_MUL the up rows of the same
    columns (``cols + N``; else the gate tile again, unused)."""
    w_mask = col_ok[:, None] & k_ok[None, :]
    w = tl.load(w_ptr + cols[:, None] * K + ks[None, :], mask=w_mask, other=0.0)
    wu = w
    if SILU_MUL:
        wu = tl.load(w_ptr + (cols + N)[:, None] * K + ks[None, :], mask=w_mask, other=0.0)
    return w, wu


@triton.jit
def _accumulate(acc, a, w, USE_DOT: tl.constexpr, PRECISION: tl.constexpr):
    a = a.to(w.dtype)
    if USE_DOT:
        acc += tl.dot(a, tl.trans(w), input_precision=PRECISION)
    else:
        acc += tl.sum(a.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    return acc


@triton.jit
def _k_tile(
    acc, acc_up, x_ptr, res_ptr, g_ptr, w_ptr, rows, row_ok, cols, col_ok, N, k0, K, rstd,
    NORM: tl.constexpr, ADD_RES: tl.constexpr, SILU_MUL: tl.constexpr, USE_DOT: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """The main loop's step: the weight tile at ``k0`` (and its up rows) into the accumulators."""
    ks = k0 + tl.arange(0, BLOCK_K)
    k_ok = ks < K
    w, wu = _weight_tile(w_ptr, cols, col_ok, N, ks, k_ok, K, SILU_MUL)
    a = _activation(x_ptr, res_ptr, g_ptr, rows, row_ok, ks, k_ok, K, rstd, NORM, ADD_RES)
    acc = _accumulate(acc, a, w, USE_DOT, PRECISION)
    if SILU_MUL:
        acc_up = _accumulate(acc_up, a, wu, USE_DOT, PRECISION)
    return acc, acc_up


@triton.jit
def _gemv_kernel(
    x_ptr, res_ptr, res_out_ptr, g_ptr, w_ptr, b_ptr, out_ptr, M, N, K, eps,
    NORM: tl.constexpr, ADD_RES: tl.constexpr, SILU_MUL: tl.constexpr, HAS_BIAS: tl.constexpr,
    USE_DOT: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr, PRELOAD_TWO: tl.constexpr,
    STAGES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < M
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    # The first weight tile (and its up rows) before anything that the launch before writes: as a
    # programmatic dependent these loads overlap that launch's tail
    ks = tl.arange(0, BLOCK_K)
    k_ok = ks < K
    w, wu = _weight_tile(w_ptr, cols, col_ok, N, ks, k_ok, K, SILU_MUL)
    ks2 = BLOCK_K + tl.arange(0, BLOCK_K)
    k2_ok = ks2 < K
    w2 = w
    if PRELOAD_TWO:  # and the second tile (K = 2 * BLOCK_K: all of this program's weights)
        w2, _ = _weight_tile(w_ptr, cols, col_ok, N, ks2, k2_ok, K, False)
    if PDL:  # x and the residual come from the launch before: wait for it to finish, then let
        # the next launch start its own weight loads (see fused_gemv's pdl)
        gdc_wait()
        gdc_launch_dependents()
    rstd = tl.zeros([BLOCK_M], tl.float32)
    if NORM:  # the rows' statistics (and, by program 0, the new residual)
        ss = tl.zeros([BLOCK_M], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            mask = row_ok[:, None] & (kk < K)[None, :]
            a = tl.load(x_ptr + rows[:, None] * K + kk[None, :], mask=mask, other=0.0)
            if ADD_RES:
                r = tl.load(res_ptr + rows[:, None] * K + kk[None, :], mask=mask, other=0.0)
                a = (a.to(tl.float32) + r.to(tl.float32)).to(a.dtype)  # rounded like torch's x + r
                if pid == 0:
                    tl.store(res_out_ptr + rows[:, None] * K + kk[None, :], a, mask=mask)
            a = a.to(tl.float32)
            ss += tl.sum(a * a, axis=1)
        rstd = tl.rsqrt(ss / K + eps)
    a = _activation(x_ptr, res_ptr, g_ptr, rows, row_ok, ks, k_ok, K, rstd, NORM, ADD_RES)
    acc = _accumulate(tl.zeros([BLOCK_M, BLOCK_N], tl.float32), a, w, USE_DOT, PRECISION)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if SILU_MUL:
        acc_up = _accumulate(acc_up, a, wu, USE_DOT, PRECISION)
    if PRELOAD_TWO:
        a = _activation(x_ptr, res_ptr, g_ptr, rows, row_ok, ks2, k2_ok, K, rstd, NORM, ADD_RES)
        acc = _accumulate(acc, a, w2, USE_DOT, PRECISION)
    start = BLOCK_K * (2 if PRELOAD_TWO else 1)
    if STAGES > 0:  # software-pipelined: STAGES tiles' loads in flight (plain loads, not only dot's)
        for k0 in tl.range(start, K, BLOCK_K, num_stages=STAGES):
            acc, acc_up = _k_tile(
                acc, acc_up, x_ptr, res_ptr, g_ptr, w_ptr, rows, row_ok, cols, col_ok, N, k0, K, rstd,
                NORM, ADD_RES, SILU_MUL, USE_DOT, PRECISION, BLOCK_K,
            )  # fmt: skip
    else:
        for k0 in range(start, K, BLOCK_K):
            acc, acc_up = _k_tile(
                acc, acc_up, x_ptr, res_ptr, g_ptr, w_ptr, rows, row_ok, cols, col_ok, N, k0, K, rstd,
                NORM, ADD_RES, SILU_MUL, USE_DOT, PRECISION, BLOCK_K,
            )  # fmt: skip
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if SILU_MUL:
            acc_up += tl.load(b_ptr + N + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out_dtype = out_ptr.dtype.element_ty
    if SILU_MUL:  # as SiluAndMul on the rounded gate/up: silu rounded, then the product
        gate = acc.to(out_dtype).to(tl.float32)
        silu = (gate / (1.0 + tl.exp(-gate))).to(out_dtype).to(tl.float32)
        acc = silu * acc_up.to(out_dtype).to(tl.float32)
    tl.store(
        out_ptr + rows[:, None] * N + cols[None, :], acc.to(out_dtype), mask=row_ok[:, None] & col_ok[None, :]
    )


def fused_gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    norm_weight: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    eps: float = 1e-6,
    silu_mul: bool = False,
    pdl: bool = False,
    tiling: GemvTiling | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``F.linear(a, weight, bias)`` for ``x`` [M <= 16, K] (contiguous) and ``weight`` [N, K]
    (contiguous), where ``a`` is ``x``, or with ``norm_weight`` ``RMSNorm(x)`` (with ``residual``:
    ``RMSNorm(x + residual)``, and ``x + residual`` is returned too, as ``RMSNorm(x, residual)``
    does). ``silu_mul``: ``weight`` packs [gate; up] ([2N, K], ``bias`` [2N]) and the result is
    ``silu(gate) * up`` [M, N]. Raises ``ValueError`` for shapes, strides or dtypes that do not fit.

    ``pdl``: launch as a programmatic dependent of the launch before it on the stream (Hopper and
    later): the kernel may start while that one finishes, loads its first weight tile, waits for
    it, and only then lets the launch after it start. Every launch of a small decode step's chain
    does the same (wait, then trigger: at most one launch runs ahead of the one computing; with
    the trigger first, launches ran layers ahead and their early weight loads slowed the critical
    path: batch-1 step 1.54 ms against 1.21 on the H200). The result is the same; ignored where
    the instruction does not exist (the interpreter, GPUs before Hopper). ``tiling``: how the
    weights are read (``GemvTiling``; default: its defaults)."""
    if x.dim() != 2 or not x.is_contiguous() or not 1 <= x.shape[0] <= MAX_ROWS:
        raise ValueError(f"x must be contiguous [M, K] with 1 <= M <= {MAX_ROWS}, got {tuple(x.shape)}")
    m, k = x.shape
    if weight.dim() != 2 or weight.shape[1] != k or not weight.is_contiguous() or weight.dtype != x.dtype:
        raise ValueError(
            f"weight must be contiguous [N, {k}] of {x.dtype}, got {tuple(weight.shape)} {weight.dtype}"
        )
    if silu_mul and weight.shape[0] % 2:
        raise ValueError(f"silu_mul needs a [2N, K] weight, got {tuple(weight.shape)}")
    n = weight.shape[0] // 2 if silu_mul else weight.shape[0]
    if bias is not None and (bias.shape != (weight.shape[0],) or not bias.is_contiguous()):
        raise ValueError(f"bias must be contiguous of shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if norm_weight is not None and norm_weight.shape != (k,):
        raise ValueError(f"norm_weight must have shape ({k},), got {tuple(norm_weight.shape)}")
    if residual is not None and (
        norm_weight is None or residual.shape != x.shape or not residual.is_contiguous()
    ):
        raise ValueError(f"residual needs norm_weight and must be contiguous like x {tuple(x.shape)}")
    pdl = pdl and pdl_usable(_gemv_kernel, x.device)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    res_out = torch.empty_like(x) if residual is not None else x
    tiling = tiling or GemvTiling()
    use_dot, block_m, block_n, block_k, preload_two = tiling.blocks(m, n, k, silu_mul)
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, residual if residual is not None else x, res_out,
        norm_weight if norm_weight is not None else x, weight, bias if bias is not None else weight,
        out, m, n, k, eps,
        NORM=norm_weight is not None, ADD_RES=residual is not None, SILU_MUL=silu_mul,
        HAS_BIAS=bias is not None, USE_DOT=use_dot,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",  # fp32 models: no TF32 rounding
        PDL=pdl, PRELOAD_TWO=preload_two, STAGES=tiling.stages, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_K=block_k, num_warps=tiling.num_warps, **({"launch_pdl": True} if pdl else {}),
    )  # fmt: skip
    return (out, res_out) if residual is not None else out


def fused_gemv_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    norm_weight: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    eps: float = 1e-6,
    silu_mul: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``fused_gemv`` in torch ops: the layers' references (``fused_ops.rms_norm_ref``,
    ``silu_and_mul_ref``) around ``F.linear``."""
    a, new_residual = x, None
    if norm_weight is not None:
        normed = rms_norm_ref(x, norm_weight, eps, residual)
        a, new_residual = normed if residual is not None else (normed, None)
    y = torch.nn.functional.linear(a, weight, bias)
    if silu_mul:
        y = silu_and_mul_ref(y)
    return (y, new_residual) if new_residual is not None else y
