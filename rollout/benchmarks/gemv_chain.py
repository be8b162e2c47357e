"""The small-batch GEMV chain of a decoder alone: per layer the qkv projection (add + RMSNorm fused
in), o, gate/up (add + RMSNorm and SiLU-and-mul fused in) and down, over 28 layers of distinct
weights (cold, as in the model) in one CUDA graph, each GEMV a programmatic dependent of the one
before; microseconds per layer for each ``GemvTiling`` and the weight bytes' share of the measured
copy bandwidth, against cuBLAS's bare GEMMs (no norms, no SiLU) as a reference.

    python -m rollout.benchmarks.gemv_chain --rows 1 2 3 4 --out $OUT

Qwen3-0.6B's shapes by default. Each variant's one-layer output is checked against the default
tiling's (``rel_err``: whole-K tiles sum K in another order). Writes ``gemv_chain.json``.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from rollout.benchmarks.common import copy_bytes_per_s, graph_ms
from rollout.kernels.gemv import GemvTiling, fused_gemv


@dataclass(frozen=True)
class Shape:
    hidden: int = 1024
    heads: int = 16
    kv_heads: int = 8
    head_dim: int = 128
    intermediate: int = 3072
    layers: int = 28


VARIANTS: dict[str, GemvTiling | None] = {
    "default": GemvTiling(),
    "whole_k": GemvTiling(whole_k=True),
    "whole_k_w2": GemvTiling(whole_k=True, num_warps=2),
    "whole_k_w8": GemvTiling(whole_k=True, num_warps=8),
    "whole_k_16k": GemvTiling(whole_k=True, tile_elems=16384),
    "whole_k_4k": GemvTiling(whole_k=True, tile_elems=4096),
    "stages3": GemvTiling(stages=3),
    "cublas_gemms_only": None,
}


def make_layers(shape: Shape, device: torch.device, dtype: torch.dtype) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator(device=device).manual_seed(0)

    def w(n: int, k: int) -> torch.Tensor:
        return (torch.randn(n, k, generator=g, device=device) * k**-0.5).to(dtype)

    q, kv, h = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim, shape.hidden
    ones = torch.ones(h, device=device, dtype=dtype)
    return [
        dict(qkv=w(q + 2 * kv, h), o=w(h, q), gate_up=w(2 * shape.intermediate, h),
             down=w(h, shape.intermediate), n1=ones, n2=ones)
        for _ in range(shape.layers)
    ]  # fmt: skip


def chain(
    layers: list[dict[str, torch.Tensor]], x: torch.Tensor, res: torch.Tensor, tiling: GemvTiling | None
) -> torch.Tensor:
    """The layers' GEMVs in order (``tiling`` None: cuBLAS GEMMs alone); returns the last output."""
    for lw in layers:
        q = lw["o"].shape[1]
        if tiling is None:
            qkv = x @ lw["qkv"].T
            o = qkv[:, :q] @ lw["o"].T
            x = (o @ lw["gate_up"].T)[:, : lw["down"].shape[1]] @ lw["down"].T
            continue
        kw = dict(pdl=True, tiling=tiling)
        qkv, res = fused_gemv(x, lw["qkv"], norm_weight=lw["n1"], residual=res, **kw)
        o = fused_gemv(qkv[:, :q].contiguous(), lw["o"], **kw)
        act, res = fused_gemv(o, lw["gate_up"], norm_weight=lw["n2"], residual=res, silu_mul=True, **kw)
        x = fused_gemv(act, lw["down"], **kw)
    return x


def probe(layers, rows: int, floor_us: float, device: torch.device) -> list[dict]:
    """Every variant at ``rows`` rows: its one-layer error against the default, then us per layer."""
    hidden = layers[0]["n1"].shape[0]
    dtype = layers[0]["qkv"].dtype
    x = torch.randn(rows, hidden, device=device).to(dtype)
    res = torch.randn(rows, hidden, device=device).to(dtype)
    ref = chain(layers[:1], x, res, GemvTiling()).float()
    results = []
    for name, tiling in VARIANTS.items():
        got = chain(layers[:1], x, res, tiling).float()
        err = float("nan") if tiling is None else ((got - ref).abs().max() / ref.abs().max()).item()
        us = graph_ms(lambda _, t=tiling: chain(layers, x, res, t), [None]) * 1e3 / len(layers)
        row = dict(rows=rows, variant=name, us_per_layer=round(us, 2), of_floor=round(floor_us / us, 3))
        row["rel_err"] = err
        results.append(row)
        print(json.dumps(row), flush=True)
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m rollout.benchmarks.gemv_chain", description=__doc__)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 3, 4])
    p.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("gemv_chain needs a CUDA device (CUDA graphs of Triton kernels)")
    device, shape = torch.device("cuda"), Shape()
    gbs = copy_bytes_per_s() / 1e9
    layers = make_layers(shape, device, torch.bfloat16)
    nbytes = sum(t.numel() * t.element_size() for lw in layers for k, t in lw.items() if k[0] != "n")
    floor_us = nbytes / (gbs * 1e9) * 1e6 / shape.layers
    print(f"copy {gbs:.0f} GB/s, weights {nbytes / 1e6:.0f} MB: {floor_us:.2f} us per layer", flush=True)
    results = [r for m in args.rows for r in probe(layers, m, floor_us, device)]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    summary = dict(copy_gbs=gbs, floor_us=floor_us, shape=asdict(shape), rows=results)
    Path(args.out, "gemv_chain.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
