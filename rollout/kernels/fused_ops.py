"""Fused element-wise kernels of the decoder layer, in Triton: residual add + RMSNorm, per-head
q/k RMSNorm + rotary embedding, and SiLU-and-mul.

Each replaces a chain of small torch ops (a Qwen3 layer ran ~40 kernels outside its GEMMs and
attention; these bring that to 3) and reproduces the torch layers' numerics: RMSNorm statistics
in fp32, the normalized value rounded to the input dtype BEFORE the weight multiply, the residual
sum rounded to the input dtype; rotary products and sums each rounded to the input dtype as HF's
``x * cos + rotate_half(x) * sin`` does; SiLU rounded before the multiply. The only differences
left are fp32 summation order and ``rsqrt``/``exp`` ulps. The ``*_ref`` functions are the torch
versions (the CPU path and the tests' reference).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from rollout.kernels._checks import check_kv_cache, check_slots, pdl_usable


# ---- residual add + RMSNorm -----------------------------------------------------------------
@triton.jit
def _rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    res_out_ptr,
    stride_x,
    stride_r,
    stride_o,
    stride_ro,
    n_cols,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    if PDL:  # see rms_norm's pdl: wait for the launch before, then let the next one start
        gdc_wait()
        gdc_launch_dependents()
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)  # rounded like torch's x + residual
        tl.store(res_out_ptr + row * stride_ro + cols, x, mask=mask)
    h = x.to(tl.float32)
    var = tl.sum(h * h, axis=0) / n_cols
    normed = (h * tl.rsqrt(var + eps)).to(x.dtype)
    y = w.to(tl.float32) * normed.to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    *,
    pdl: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``RMSNorm`` over the last dim of a 2-D ``x`` [T, H]; with ``residual`` first ``x + residual``,
    returning ``(norm, x + residual)`` like ``rollout.models.layers.norm.RMSNorm``.

    ``pdl``: launch as a programmatic dependent of the launch before it (``kernels.gemv``'s chain
    of small-batch launches; Hopper and later, ignored elsewhere): it loads the norm weight, waits
    for that launch, then lets the next one start and reads ``x``."""
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"x must be 2-D with unit inner stride, got {tuple(x.shape)} {x.stride()}")
    rows, cols = x.shape
    if weight.shape != (cols,) or not weight.is_contiguous():
        raise ValueError(f"weight must be contiguous of shape ({cols},), got {tuple(weight.shape)}")
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    out = torch.empty((rows, cols), dtype=out_dtype, device=x.device)
    if residual is not None:
        if residual.shape != x.shape or residual.stride(-1) != 1 or residual.dtype != x.dtype:
            raise ValueError(f"residual must match x {tuple(x.shape)} {x.dtype}, got {tuple(residual.shape)}")
        res_out = torch.empty_like(x, memory_format=torch.contiguous_format)
    else:
        residual = res_out = x  # unused
    if rows:
        block = triton.next_power_of_2(cols)
        pdl = pdl and pdl_usable(_rms_norm_kernel, x.device)
        _rms_norm_kernel[(rows,)](
            x,
            residual,
            weight,
            out,
            res_out,
            x.stride(0),
            residual.stride(0),
            out.stride(0),
            res_out.stride(0),
            cols,
            eps,
            HAS_RESIDUAL=res_out is not x,
            BLOCK=block,
            PDL=pdl,
            num_warps=min(max(block // 256, 1), 8),
            **({"launch_pdl": True} if pdl else {}),
        )
    return out if res_out is x else (out, res_out)


def rms_norm_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    if residual is not None:
        x = x + residual
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    y = weight * h.to(x.dtype)
    return y if residual is None else (y, x)


# ---- q/k RMSNorm + rotary ---------------------------------------------------------------------
@triton.jit
def _rope_heads(
    src_ptr,
    dst_ptr,
    w_ptr,
    cos,
    sin,
    src_row,
    dst_row,
    dst_stride_h,
    store_heads,
    eps,
    NUM_HEADS: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    HALF: tl.constexpr,
    HAS_NORM: tl.constexpr,
):
    heads = tl.arange(0, HEADS_PAD)[:, None]
    d = tl.arange(0, HALF)[None, :]
    mask = heads < NUM_HEADS
    offs = heads * (2 * HALF) + d
    x1 = tl.load(src_ptr + src_row + offs, mask=mask, other=0.0)
    x2 = tl.load(src_ptr + src_row + offs + HALF, mask=mask, other=0.0)
    if HAS_NORM:
        h1, h2 = x1.to(tl.float32), x2.to(tl.float32)
        var = (tl.sum(h1 * h1, axis=1) + tl.sum(h2 * h2, axis=1)) / (2 * HALF)
        inv = tl.rsqrt(var + eps)[:, None]
        w1 = tl.load(w_ptr + d).to(tl.float32)
        w2 = tl.load(w_ptr + d + HALF).to(tl.float32)
        x1 = (w1 * (h1 * inv).to(x1.dtype).to(tl.float32)).to(x1.dtype)
        x2 = (w2 * (h2 * inv).to(x2.dtype).to(tl.float32)).to(x2.dtype)
    f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
    dt = x1.dtype
    # each product and sum rounded to the input dtype, as torch does op by op
    o1 = (f1 * cos).to(dt).to(tl.float32) - (f2 * sin).to(dt).to(tl.float32)
    o2 = (f2 * cos).to(dt).to(tl.float32) + (f1 * sin).to(dt).to(tl.float32)
    dst = dst_ptr + dst_row + heads * dst_stride_h + d
    stored = heads < store_heads  # NUM_HEADS, or 0 to store nothing (a padding row)
    tl.store(dst, o1.to(dst_ptr.dtype.element_ty), mask=stored)
    tl.store(dst + HALF, o2.to(dst_ptr.dtype.element_ty), mask=stored)


@triton.jit
def _qk_norm_rope_kernel(
    qkv_ptr,
    pos_ptr,
    table_ptr,
    qw_ptr,
    kw_ptr,
    q_out_ptr,
    k_out_ptr,
    v_out_ptr,
    slot_ptr,
    stride_t,
    stride_table,
    k_offset,
    eps,
    stride_kc_block,
    stride_kc_slot,
    stride_kc_head,
    stride_vc_block,
    stride_vc_slot,
    stride_vc_head,
    NUM_Q: tl.constexpr,
    NUM_KV: tl.constexpr,
    Q_PAD: tl.constexpr,
    KV_PAD: tl.constexpr,
    HALF: tl.constexpr,
    HAS_NORM: tl.constexpr,
    STORE_KV: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    PDL: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    # positions, slots and the table are step inputs and constants that no launch of the chain
    # writes: loaded before the wait
    pos = tl.load(pos_ptr + t).to(tl.int64)
    d = tl.arange(0, HALF)[None, :]
    # the table is cast to the activations' dtype first (HF casts cos/sin to the input dtype)
    cos = tl.load(table_ptr + pos * stride_table + d).to(q_out_ptr.dtype.element_ty).to(tl.float32)
    sin = tl.load(table_ptr + pos * stride_table + HALF + d).to(q_out_ptr.dtype.element_ty).to(tl.float32)
    slot = tl.load(slot_ptr + t).to(tl.int64)  # block * stride can pass 2**31 elements
    if PDL:  # qkv comes from the launch before; then the next launch may start (qk_norm_rope_store)
        gdc_wait()
        gdc_launch_dependents()
    src = t * stride_t
    _rope_heads(
        qkv_ptr,
        q_out_ptr,
        qw_ptr,
        cos,
        sin,
        src,
        t * NUM_Q * 2 * HALF,
        2 * HALF,
        NUM_Q,
        eps,
        NUM_Q,
        Q_PAD,
        HALF,
        HAS_NORM,
    )
    if STORE_KV:  # rotated k and raw v go straight to their cache slot (-1: a padding row, skipped)
        k_heads = tl.where(slot >= 0, NUM_KV, 0)
        block = tl.maximum(slot, 0) // BLOCK_SIZE
        offset = tl.maximum(slot, 0) % BLOCK_SIZE
        k_row = block * stride_kc_block + offset * stride_kc_slot
        k_stride_h = stride_kc_head
    else:
        k_heads = NUM_KV
        k_row = t * NUM_KV * 2 * HALF
        k_stride_h = 2 * HALF
    _rope_heads(
        qkv_ptr,
        k_out_ptr,
        kw_ptr,
        cos,
        sin,
        src + k_offset,
        k_row,
        k_stride_h,
        k_heads,
        eps,
        NUM_KV,
        KV_PAD,
        HALF,
        HAS_NORM,
    )
    if STORE_KV:
        heads = tl.arange(0, KV_PAD)[:, None]
        dd = tl.arange(0, 2 * HALF)[None, :]
        v = tl.load(
            qkv_ptr + src + k_offset + NUM_KV * 2 * HALF + heads * (2 * HALF) + dd, mask=heads < NUM_KV
        )
        v_dst = v_out_ptr + block * stride_vc_block + offset * stride_vc_slot + heads * stride_vc_head + dd
        tl.store(v_dst, v.to(v_out_ptr.dtype.element_ty), mask=heads < k_heads)


def qk_norm_rope(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    q_weight: torch.Tensor | None = None,
    k_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """From the packed projection ``qkv`` [T, (Hq + 2 Hkv) * D], return rotated ``q`` [T, Hq, D] and
    ``k`` [T, Hkv, D] (new contiguous tensors), each head first RMS-normalized with ``q_weight`` /
    ``k_weight`` when given (Qwen3). ``cos_sin_cache`` [max_pos, D] holds cos then sin per row."""
    check_qk(qkv, positions, cos_sin_cache, num_heads, num_kv_heads, head_dim, q_weight, k_weight)
    tokens = qkv.shape[0]
    q = torch.empty((tokens, num_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    k = torch.empty((tokens, num_kv_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    _launch_qk(qkv, positions, cos_sin_cache, q, k, None, None, num_kv_heads, q_weight, k_weight, eps)
    return q, k


def qk_norm_rope_store(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    q_weight: torch.Tensor | None = None,
    k_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    *,
    pdl: bool = False,
) -> torch.Tensor:
    """``qk_norm_rope`` that also stores this step's K/V: rotated ``k`` and the raw ``v`` (the last
    ``Hkv * D`` columns of ``qkv``) go to their paged cache slots (``slot_mapping`` [T], -1 skips a
    padding row), as ``store_kv`` would; returns ``q`` only. One launch instead of two, and ``k``
    is never written to memory outside the cache.

    ``pdl``: launch as a programmatic dependent of the launch before it (Hopper and later, ignored
    elsewhere): it reads the positions, slots and cos/sin rows, waits for that launch, then lets
    the launch after it start and reads ``qkv``. Only for chains where no launch writes the
    positions or slots (a decode step's: they are copied in before its first kernel)."""
    check_qk(qkv, positions, cos_sin_cache, num_heads, num_kv_heads, head_dim, q_weight, k_weight, True)
    tokens = qkv.shape[0]
    _, _, cache_heads, cache_dim = check_kv_cache(k_cache, v_cache)
    if (cache_heads, cache_dim) != (num_kv_heads, head_dim) or k_cache.dtype != qkv.dtype:
        raise ValueError(
            f"cache {tuple(k_cache.shape)} {k_cache.dtype} does not hold {num_kv_heads} heads of "
            f"{head_dim} in {qkv.dtype}"
        )
    if k_cache.device != qkv.device:
        raise ValueError(f"cache on {k_cache.device}, qkv on {qkv.device}")
    check_slots(slot_mapping, tokens, qkv.device)
    q = torch.empty((tokens, num_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    _launch_qk(
        qkv,
        positions,
        cos_sin_cache,
        q,
        k_cache,
        v_cache,
        slot_mapping,
        num_kv_heads,
        q_weight,
        k_weight,
        eps,
        pdl,
    )
    return q


def check_qk(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    with_v: bool = False,
) -> None:
    """The q/k kernels' arguments; ``with_v``: ``qkv`` is exactly q, k and v packed (the storing
    kernels read v from its last ``num_kv_heads * head_dim`` columns)."""
    if qkv.dim() != 2 or qkv.stride(-1) != 1:
        raise ValueError(f"qkv must be 2-D with unit inner stride, got {tuple(qkv.shape)} {qkv.stride()}")
    tokens = qkv.shape[0]
    if qkv.shape[1] < (num_heads + num_kv_heads) * head_dim or head_dim % 2:
        raise ValueError(
            f"qkv {tuple(qkv.shape)} too narrow for {num_heads}+{num_kv_heads} heads of {head_dim}"
        )
    if with_v and qkv.shape[1] != (num_heads + 2 * num_kv_heads) * head_dim:
        raise ValueError(f"qkv {tuple(qkv.shape)} is not q, k, v of {num_heads}/{num_kv_heads} heads")
    if head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two, got {head_dim}")
    if (
        positions.shape != (tokens,)
        or positions.device != qkv.device
        or positions.dtype not in (torch.int32, torch.int64)
    ):
        raise ValueError(
            f"positions must be int32/int64 [{tokens}] on {qkv.device}, got {tuple(positions.shape)} "
            f"{positions.dtype} on {positions.device}"
        )
    if (
        cos_sin_cache.dim() != 2
        or cos_sin_cache.shape[1] != head_dim
        or cos_sin_cache.stride(1) != 1
        or cos_sin_cache.device != qkv.device
    ):
        raise ValueError(
            f"cos_sin_cache must be [max_pos, {head_dim}] on {qkv.device} with unit inner stride, got "
            f"{tuple(cos_sin_cache.shape)} on {cos_sin_cache.device}"
        )
    if (q_weight is None) != (k_weight is None):
        raise ValueError("give both q_weight and k_weight or neither")
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight)):
        # the kernels read w[d] at w_ptr + d: a strided weight would be read wrong, silently
        if w is not None and (w.shape != (head_dim,) or not w.is_contiguous() or w.device != qkv.device):
            raise ValueError(
                f"{name} must be contiguous ({head_dim},) on {qkv.device}, got {tuple(w.shape)} "
                f"strides {w.stride()} on {w.device}"
            )


def _launch_qk(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    q: torch.Tensor,
    k_out: torch.Tensor,
    v_cache: torch.Tensor | None,
    slots: torch.Tensor | None,
    num_kv_heads: int,
    q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    eps: float,
    pdl: bool = False,
) -> None:
    """One program per token. ``v_cache`` given: ``k_out`` is the K cache and ``slots`` its slots."""
    tokens, num_heads, head_dim = q.shape
    if not tokens:
        return
    pdl = pdl and pdl_usable(_qk_norm_rope_kernel, qkv.device)
    store = v_cache is not None
    has_norm = q_weight is not None
    cache_strides = (*k_out.stride()[:3], *v_cache.stride()[:3]) if store else (0,) * 6
    _qk_norm_rope_kernel[(tokens,)](
        qkv,
        positions,
        cos_sin_cache,
        q_weight if has_norm else qkv,
        k_weight if has_norm else qkv,
        q,
        k_out,
        v_cache if store else k_out,
        slots if store else positions,
        qkv.stride(0),
        cos_sin_cache.stride(0),
        num_heads * head_dim,
        eps,
        *cache_strides,
        NUM_Q=num_heads,
        NUM_KV=num_kv_heads,
        Q_PAD=triton.next_power_of_2(num_heads),
        KV_PAD=triton.next_power_of_2(num_kv_heads),
        HALF=head_dim // 2,
        HAS_NORM=has_norm,
        STORE_KV=store,
        BLOCK_SIZE=k_out.shape[1] if store else 1,
        PDL=pdl,
        num_warps=4,
        **({"launch_pdl": True} if pdl else {}),
    )


def qk_norm_rope_ref(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    q_weight: torch.Tensor | None = None,
    k_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    from rollout.models.layers.rotary import apply_rotary

    tokens = qkv.shape[0]
    q = qkv[:, : num_heads * head_dim].reshape(tokens, num_heads, head_dim)
    k = qkv[:, num_heads * head_dim : (num_heads + num_kv_heads) * head_dim].reshape(
        tokens, num_kv_heads, head_dim
    )
    if q_weight is not None:
        q, k = rms_norm_ref(q, q_weight, eps), rms_norm_ref(k, k_weight, eps)
    cos, sin = cos_sin_cache[positions].chunk(2, dim=-1)
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


# ---- SiLU and mul -----------------------------------------------------------------------------
@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, d, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    g = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    u = tl.load(x_ptr + row * stride_x + d + cols, mask=mask, other=0.0)
    gf = g.to(tl.float32)
    s = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)  # F.silu rounds to the input dtype
    tl.store(out_ptr + row * stride_o + cols, (s.to(tl.float32) * u.to(tl.float32)).to(g.dtype), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``[T, 2d]`` packed (gate, up) -> ``silu(gate) * up`` [T, d]."""
    if x.dim() != 2 or x.shape[1] % 2 or x.stride(-1) != 1:
        raise ValueError(f"x must be [T, 2d] with unit inner stride, got {tuple(x.shape)} {x.stride()}")
    rows, d = x.shape[0], x.shape[1] // 2
    out = torch.empty((rows, d), dtype=x.dtype, device=x.device)
    if rows:
        block = min(1024, triton.next_power_of_2(d))
        _silu_and_mul_kernel[(rows, triton.cdiv(d, block))](
            x, out, x.stride(0), out.stride(0), d, BLOCK=block, num_warps=4
        )
    return out


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up
