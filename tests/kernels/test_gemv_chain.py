"""The GEMV-chain benchmark's chain (rollout.benchmarks.gemv_chain) on tiny shapes (in the
interpreter on CPU, compiled on CUDA): every tiling it times computes the same layers as the torch
reference."""

from __future__ import annotations

import pytest
import torch

from rollout.benchmarks.gemv_chain import VARIANTS, Shape, chain, make_layers
from rollout.kernels.gemv import fused_gemv_ref

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def reference(layers, x, res):
    for lw in layers:
        qkv, res = fused_gemv_ref(x, lw["qkv"], norm_weight=lw["n1"], residual=res)
        o = fused_gemv_ref(qkv[:, : lw["o"].shape[1]], lw["o"])
        act, res = fused_gemv_ref(o, lw["gate_up"], norm_weight=lw["n2"], residual=res, silu_mul=True)
        x = fused_gemv_ref(act, lw["down"])
    return x


@pytest.mark.parametrize("rows", [1, 3])
def test_chain_variants_match_reference(triton_interpreter, rows):
    shape = Shape(hidden=64, heads=2, kv_heads=1, head_dim=32, intermediate=96, layers=2)
    layers = make_layers(shape, DEVICE, torch.float32)
    g = torch.Generator().manual_seed(rows)
    x, res = (torch.randn(rows, 64, generator=g).to(DEVICE) for _ in range(2))
    want = reference(layers, x, res)
    for name, tiling in VARIANTS.items():
        if tiling is None:  # the bare-GEMM reference skips the norms: another computation
            continue
        got = chain(layers, x, res, tiling)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=lambda m, name=name: f"{name}: {m}")
