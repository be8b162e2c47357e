"""Compile every Triton kernel launch of the engine's launchers for an H100/H200 (sm_90) without a
GPU: Triton's NVIDIA backend and its bundled ptxas run on any machine. It catches what the
interpreter cannot: PTX that ptxas refuses (e.g. a cache modifier with an eviction policy),
unsupported layouts, a constexpr combination that does not lower.

The launchers run as usual on small CPU tensors (their checks, configs and constexprs are the
real ones); each ``kernel[grid](...)`` is compiled for sm_90 from the arguments it was given
instead of launched. Run as ``python -m tests.kernels.compile_sm90`` in a process without
``TRITON_INTERPRET`` (the interpreter replaces the kernels when they are defined); it prints one
JSON object per launch.
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
from collections.abc import Iterator

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

_TARGET = GPUTarget("cuda", 90, 32)
_DTYPES = {
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float32: "fp32",
    torch.float64: "fp64",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.int16: "i16",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.bool: "i1",
}
_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


def _type(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _DTYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(value).__name__}")


def compile_launch(kernel: JITFunction, args: tuple, kwargs: dict) -> dict:
    """Compile one launch's kernel for sm_90; a JSON-able summary (ok, error or the atomics)."""
    options = {k: kwargs.pop(k) for k in _OPTIONS if k in kwargs}
    values = dict(zip(kernel.arg_names, args, strict=False)) | kwargs
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(kernel.params):
        value = values.get(param.name, param.default)
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[(i,)] = value
            continue
        signature[param.name] = _type(value)
        # Triton's launch specializes on 16-byte alignment: pointers (the CUDA allocator aligns to
        # 256) and ints divisible by 16 unless marked do_not_specialize
        aligned = isinstance(value, torch.Tensor) or (
            type(value) is int and value % 16 == 0 and not param.do_not_specialize
        )
        if aligned:
            attrs[(i,)] = [["tt.divisibility", 16]]
    name = kernel.fn.__name__
    try:
        source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
        ptx = triton.compile(source, target=_TARGET, options=options).asm["ptx"]
    except Exception as e:  # noqa: BLE001 - reported: every launch gets checked
        return dict(kernel=name, ok=False, error=f"{type(e).__name__}: {str(e)[:2000]}")
    return dict(
        kernel=name,
        ok=True,
        atomics=sorted(set(re.findall(r"atom\.[a-z0-9_.]+", ptx))),
        griddepcontrol=sorted(set(re.findall(r"griddepcontrol\.[a-z_]+", ptx))),
    )


@contextlib.contextmanager
def compiled_not_launched() -> Iterator[list[dict]]:
    """Within the block, ``kernel[grid](...)`` compiles for sm_90 instead of launching; the list
    fills with ``compile_launch`` summaries."""
    results: list[dict] = []
    run = JITFunction.run

    def compile_instead(self, *args, grid, warmup, **kwargs):
        results.append(compile_launch(self, args, kwargs))

    JITFunction.run = compile_instead
    try:
        yield results
    finally:
        JITFunction.run = run


@contextlib.contextmanager
def as_on_hopper() -> Iterator[None]:
    """Within the block, the launchers take their CPU tensors for an sm_90 device's: they use
    programmatic dependent launch (``pdl_supported``) where they would there."""
    from rollout.kernels import _checks

    saved = _checks.pdl_supported
    _checks.pdl_supported = lambda device: True
    try:
        yield
    finally:
        _checks.pdl_supported = saved


def launch_all() -> None:
    """Every launcher of the engine on small bf16 CPU tensors, in the variants the engine uses."""
    from rollout.kernels.decode_attention import DecodeConfig, decode_attention, decode_attention_qkv
    from rollout.kernels.fused_ops import qk_norm_rope_store, rms_norm, silu_and_mul
    from rollout.kernels.prefill_attention import ExtendConfig, extend_attention, extend_tiles
    from rollout.kernels.store_kv import store_kv

    bf16, i32 = torch.bfloat16, torch.int32
    heads, kv_heads, dim, block, blocks, batch = 16, 8, 128, 16, 64, 4
    k_cache = torch.zeros(blocks, block, kv_heads, dim, dtype=bf16)
    v_cache = torch.zeros_like(k_cache)
    tables = torch.zeros(batch, 8, dtype=i32)
    lens = torch.full((batch,), 100, dtype=i32)
    q = torch.zeros(batch, heads, dim, dtype=bf16)
    order = torch.arange(batch, dtype=i32)
    counters = torch.zeros(batch * kv_heads, dtype=i32)
    split, whole = DecodeConfig(16, 128), DecodeConfig(1, 64, num_stages=3)  # the two default shapes
    for window in (None, 64):
        decode_attention(q, k_cache, v_cache, tables, lens, 0.1, window, split, order=order)  # + merge
        decode_attention(q, k_cache, v_cache, tables, lens, 0.1, window, whole, order=order)
        decode_attention(q, k_cache, v_cache, tables, lens, 0.1, window, split, counters=counters)
    # a small decode step's chain of programmatic dependents (split + merge, and unsplit)
    decode_attention(q, k_cache, v_cache, tables, lens, 0.1, None, split, order=order, pdl=True)
    decode_attention(q, k_cache, v_cache, tables, lens, 0.1, None, whole, order=order, pdl=True)
    # decode steps: q/k norm + RoPE + K/V store in the attention launch (plain, and as the chain)
    packed = torch.zeros(batch, (heads + 2 * kv_heads) * dim, dtype=bf16)
    rope_table, norm = torch.zeros(4096, dim, dtype=torch.float32), torch.ones(dim, dtype=bf16)
    pos = torch.arange(batch)
    for config, pdl in ((split, False), (whole, False), (split, True), (whole, True)):
        decode_attention_qkv(
            packed, pos, rope_table, heads, k_cache, v_cache, tables, lens, pos, 0.1, norm, norm,
            config=config, order=order, pdl=pdl,
        )  # fmt: skip
    decode_attention_qkv(  # the first K/V tile loaded before the wait (64-position tiles, split)
        packed, pos, rope_table, heads, k_cache, v_cache, tables, lens, pos, 0.1, norm, norm,
        config=DecodeConfig(16, 64), order=order, pdl=True, preload=True,
    )  # fmt: skip
    rows = 64
    qx = torch.zeros(rows, heads, dim, dtype=bf16)
    starts = torch.tensor([0, 1, 40, rows], dtype=i32)
    lens3 = torch.tensor([50, 60, 24], dtype=i32)
    tables3 = torch.zeros(3, 8, dtype=i32)
    extend_attention(qx, k_cache, v_cache, tables3, lens3, starts, 39, 0.1, first_seq=1)
    config = ExtendConfig(block_m=128, pack_gqa=True)
    tiles = extend_tiles([1, 39, 24], 1, 64, 8)
    extend_attention(qx, k_cache, v_cache, tables3, lens3, starts, rows, 0.1, 64, config, tiles=tiles)
    big = ExtendConfig(block_m=256, block_n=64, num_warps=8, num_stages=3, pack_gqa=True)
    extend_attention(qx, k_cache, v_cache, tables3, lens3, starts, 39, 0.1, config=big)
    kv = torch.zeros(rows, kv_heads, dim, dtype=bf16)
    store_kv(kv, kv, k_cache, v_cache, torch.arange(rows))
    hidden = torch.zeros(rows, 1024, dtype=bf16)
    weight = torch.ones(1024, dtype=bf16)
    rms_norm(hidden, weight, 1e-6)
    rms_norm(hidden, weight, 1e-6, hidden.clone())
    rms_norm(hidden[:1], weight, 1e-6, hidden[:1].clone(), pdl=True)  # the final norm at batch 1
    silu_and_mul(torch.zeros(rows, 2 * 3072, dtype=bf16))
    qkv = torch.zeros(rows, (heads + 2 * kv_heads) * dim, dtype=bf16)
    table = torch.zeros(4096, dim, dtype=torch.float32)
    norm_w = torch.ones(dim, dtype=bf16)
    qk_norm_rope_store(
        qkv, torch.arange(rows), table, heads, kv_heads, dim, k_cache, v_cache, torch.arange(rows),
        norm_w, norm_w, 1e-6,
    )  # fmt: skip
    qk_norm_rope_store(
        qkv[:1], torch.arange(1), table, heads, kv_heads, dim, k_cache, v_cache, torch.arange(1),
        norm_w, norm_w, 1e-6, pdl=True,
    )  # fmt: skip
    _launch_gemv()
    _launch_sampling()


def _launch_gemv() -> None:
    """The small-batch projections as a Qwen3-0.6B layer runs them, at 1 row and at 8 (tensor
    cores), plain and as programmatic dependent launches."""
    from rollout.kernels.gemv import fused_gemv

    bf16 = torch.bfloat16
    g = torch.ones(1024, dtype=bf16)
    for rows, pdl in ((1, False), (8, False), (1, True), (8, True)):
        x = torch.zeros(rows, 1024, dtype=bf16)
        fused_gemv(x, torch.zeros(4096, 1024, dtype=bf16), norm_weight=g, residual=x.clone(), pdl=pdl)
        fused_gemv(x, torch.zeros(4096, 1024, dtype=bf16), norm_weight=g, pdl=pdl)
        o = fused_gemv(torch.zeros(rows, 2048, dtype=bf16), torch.zeros(1024, 2048, dtype=bf16), pdl=pdl)
        act, _ = fused_gemv(
            o, torch.zeros(6144, 1024, dtype=bf16), norm_weight=g, residual=x, silu_mul=True, pdl=pdl
        )
        fused_gemv(act, torch.zeros(1024, 3072, dtype=bf16), torch.zeros(1024, dtype=bf16), pdl=pdl)


def _launch_sampling() -> None:
    from rollout.kernels import sampling

    batch, vocab = 4, 5000
    logits = torch.zeros(batch, vocab, dtype=torch.bfloat16)
    temperature = torch.ones(batch)
    flags = torch.zeros(batch, dtype=torch.bool)
    seeds, offsets = torch.zeros(batch, dtype=torch.int64), torch.zeros(batch, dtype=torch.int64)
    bans = torch.tensor([1, 2], dtype=torch.int64)
    none = torch.zeros(0, dtype=torch.int64)
    check = sampling._check
    sampling._check = lambda *args: None  # it refuses CPU logits outside the interpreter
    try:
        args = (logits, temperature, flags, seeds, offsets, flags)
        sampling.fused_sample(*args, bans, bans, all_greedy=False, any_processed=True, write_source=True)
        sampling.fused_sample(*args, none, none, all_greedy=True, any_processed=False)
    finally:
        sampling._check = check
    sampling.race_noise(seeds, offsets, 300)


def main() -> int:
    with compiled_not_launched() as results, as_on_hopper():
        launch_all()
    for r in results:
        print(json.dumps(r), flush=True)
    return 0 if results and all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
