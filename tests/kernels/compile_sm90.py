"""Compile Triton kernel variants for an H100/H200 (sm_90) without a GPU: Triton's NVIDIA backend
and its bundled ptxas run on any machine. It catches what the interpreter cannot: PTX that ptxas
refuses (e.g. a cache modifier with an eviction policy), unsupported shapes, register blow-ups.

Run as ``python -m tests.kernels.compile_sm90`` in a process without ``TRITON_INTERPRET`` (the
interpreter replaces the kernels when they are defined); prints one JSON object per variant.
"""

from __future__ import annotations

import json
import re
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from rollout.kernels import decode_attention, prefetch, prefill_attention

_TARGET = GPUTarget("cuda", 90, 32)


def compile_variant(kernel, types: dict[str, str], constexprs: dict, warps: int = 4, stages: int = 2):
    """``kernel`` (a ``triton.jit`` function) compiled for sm_90; arguments not in ``types`` or
    ``constexprs`` are i32 scalars."""
    names = kernel.arg_names
    signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in names}
    values = {(names.index(n),): v for n, v in constexprs.items()}
    source = ASTSource(fn=kernel, signature=signature, constexprs=values)
    return triton.compile(source, target=_TARGET, options={"num_warps": warps, "num_stages": stages})


def variants():
    """(name, kernel, argument types, constexprs, warps, stages) of the variants checked."""
    bf16, i32p, f32p = "*bf16", "*i32", "*fp32"
    decode_types = dict(
        order_ptr=i32p, q_ptr=bf16, k_cache_ptr=bf16, v_cache_ptr=bf16, block_tables_ptr=i32p,
        seq_lens_ptr=i32p, out_ptr=bf16, part_out_ptr=f32p, part_lse_ptr=f32p, counters_ptr=i32p,
        scale_log2="fp32",
    )  # fmt: skip
    for group, window, fused in ((2, False, True), (8, True, True), (2, True, False)):
        splits = 32
        c = dict(
            GROUP=group, GROUP_PAD=16, HEAD_DIM=128, BLOCK_D=128, BLOCK_SIZE=16, BLOCK_N=128,
            HAS_WINDOW=window, USE_DOT=True, SPLIT=True, PRECISION="tf32", NUM_KV_HEADS=8,
            HAS_ORDER=True, FUSED_MERGE=fused, GROUP_P2=group, SPLITS_PAD=splits,
            SPLIT_CHUNK=decode_attention._split_chunk(group, 128, splits),
        )  # fmt: skip
        yield (
            f"decode_g{group}_w{int(window)}_fused{int(fused)}",
            decode_attention._decode_split_kernel,
            decode_types,
            c,
            4,
            2,
        )
    merge_types = dict(part_out_ptr=f32p, part_lse_ptr=f32p, out_ptr=bf16)
    yield (
        "merge",
        decode_attention._merge_splits_kernel,
        merge_types,
        dict(HEAD_DIM=128, BLOCK_D=128, SPLITS_PAD=32),
        4,
        2,
    )
    extend_types = dict(
        q_ptr=bf16, k_cache_ptr=bf16, v_cache_ptr=bf16, block_tables_ptr=i32p, seq_lens_ptr=i32p,
        query_start_ptr=i32p, out_ptr=bf16, scale_log2="fp32", tiles_ptr=i32p,
    )  # fmt: skip
    c = dict(GROUP=2, HEAD_DIM=128, BLOCK_D=128, BLOCK_SIZE=16, BLOCK_M=64, BLOCK_N=32, HAS_WINDOW=False,
             PRECISION="tf32", PACK=2, TILE_LIST=True)  # fmt: skip
    yield "extend_tiles", prefill_attention._extend_kernel, extend_types, c, 4, 3
    prefetch_types = dict(src_ptr=i32p, sink_ptr=i32p)
    yield (
        "prefetch",
        prefetch._prefetch_kernel,
        prefetch_types,
        dict(BLOCK=prefetch._BLOCK),
        prefetch._WARPS,
        2,
    )


def main() -> int:
    failed = 0
    for name, kernel, types, constexprs, warps, stages in variants():
        try:
            ptx = compile_variant(kernel, types, constexprs, warps, stages).asm["ptx"]
            atomics = sorted(set(re.findall(r"atom\.[a-z0-9_.]+", ptx)))
            print(json.dumps(dict(name=name, ok=True, atomics=atomics)), flush=True)
        except Exception as e:  # noqa: BLE001 - reported, not raised: every variant gets checked
            failed += 1
            print(
                json.dumps(dict(name=name, ok=False, error=f"{type(e).__name__}: {str(e)[:2000]}")),
                flush=True,
            )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
