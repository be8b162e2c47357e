"""The fused small-batch projections (rollout.kernels.gemv) against their torch reference: plain,
with the RMSNorm prologue (with and without the residual add), with the SiLU-and-mul epilogue and
biases, on 1-16 rows and widths that do not fill the launch's blocks. fp32/fp16 on the CPU under
the interpreter; bf16 on the GPU too."""

from __future__ import annotations

import pytest
import torch

from rollout.kernels.gemv import GemvTiling, fused_gemv, fused_gemv_ref

pytestmark = pytest.mark.usefixtures("triton_interpreter")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def tensors(m, k, n, dtype, seed, silu_mul=False, bias=False):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=1.0: (scale * torch.randn(*s, generator=gen)).to(dtype).to(DEVICE)  # noqa: E731
    rows = 2 * n if silu_mul else n
    return dict(
        x=r(m, k),
        residual=r(m, k),
        weight=r(rows, k, scale=k**-0.5),
        bias=r(rows, scale=0.1) if bias else None,
        norm_weight=(1 + r(k, scale=0.1)),
    )


def close(got, want, dtype):
    err = ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-6)).item()
    assert err < TOL[dtype], err


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 3, 4, 5, 16])
@pytest.mark.parametrize(("k", "n"), [(64, 40), (96, 130)])
def test_fused_gemv_matches_reference(dtype, m, k, n):
    t = tensors(m, k, n, dtype, seed=m * 1000 + k + n, bias=True)
    close(fused_gemv(t["x"], t["weight"]), fused_gemv_ref(t["x"], t["weight"]), dtype)
    close(fused_gemv(t["x"], t["weight"], t["bias"]), fused_gemv_ref(t["x"], t["weight"], t["bias"]), dtype)
    got = fused_gemv(t["x"], t["weight"], norm_weight=t["norm_weight"])
    close(got, fused_gemv_ref(t["x"], t["weight"], norm_weight=t["norm_weight"]), dtype)
    got, res = fused_gemv(t["x"], t["weight"], norm_weight=t["norm_weight"], residual=t["residual"])
    want, want_res = fused_gemv_ref(t["x"], t["weight"], norm_weight=t["norm_weight"], residual=t["residual"])
    close(got, want, dtype)
    assert torch.equal(res, want_res)  # the new residual: x + residual, rounded once


@pytest.mark.parametrize(("m", "k", "n"), [(1, 1024, 2048), (1, 2048, 40), (1, 1536, 2048), (2, 1024, 64)])
def test_fused_gemv_multi_tile_reductions(m, k, n):
    """Reductions over several K tiles: at one row a program whose weights are exactly two tiles
    (1024 x 2048, 2048 x 40) loads both before its wait; three tiles (1536) and 2 rows loop."""
    t = tensors(m, k, n, torch.float32, seed=k + n + m)
    got, res = fused_gemv(t["x"], t["weight"], norm_weight=t["norm_weight"], residual=t["residual"])
    want, want_res = fused_gemv_ref(t["x"], t["weight"], norm_weight=t["norm_weight"], residual=t["residual"])
    close(got, want, torch.float32)
    assert torch.equal(res, want_res)


@pytest.mark.parametrize(
    "tiling",
    [GemvTiling(stages=2), GemvTiling(whole_k=True), GemvTiling(whole_k=True, tile_elems=2048, num_warps=8)],
    ids=["stages2", "whole_k", "whole_k_small"],
)
@pytest.mark.parametrize(
    ("m", "k", "n"),
    [(1, 3072, 40), (1, 1024, 24), (2, 1536, 48), (3, 96, 20), (4, 3072, 24), (6, 3072, 40), (16, 640, 24)],
)
def test_fused_gemv_tilings(tiling, m, k, n):
    """The other ways to read the weights (GemvTiling): a pipelined loop gives the default's
    result bit for bit (same tiles, same order); whole-K tiles (K rounded up to a power of two,
    masked; where K is too long for 2 columns a program, the default tiles) match the reference,
    with the norm + residual prologue and with the SiLU-and-mul epilogue."""
    t = tensors(m, k, n, torch.float32, seed=k + n + m, silu_mul=True, bias=True)
    dense = t["weight"][:n].contiguous()
    for weight, bias, extra in [(dense, None, {}), (t["weight"], t["bias"], {"silu_mul": True})]:
        kw = dict(norm_weight=t["norm_weight"], residual=t["residual"], **extra)
        got, res = fused_gemv(t["x"], weight, bias, tiling=tiling, **kw)
        want, want_res = fused_gemv_ref(t["x"], weight, bias, **kw)
        close(got, want, torch.float32)
        assert torch.equal(res, want_res)
        if tiling.stages:
            assert torch.equal(got, fused_gemv(t["x"], weight, bias, **kw)[0])


def test_gemv_tiling_blocks():
    """Whole-K: one tile over K (3,072 -> 4,096) and as many columns as tile_elems allow, the same
    columns at every row count up to 4."""
    assert GemvTiling(whole_k=True).blocks(1, 1024, 3072, False) == (False, 1, 2, 4096, False)
    assert GemvTiling(whole_k=True).blocks(2, 1024, 3072, False) == (False, 2, 2, 4096, False)
    assert GemvTiling(whole_k=True).blocks(3, 4096, 1024, False) == (False, 4, 8, 1024, False)
    assert GemvTiling(whole_k=True).blocks(1, 4096, 1024, False) == (False, 1, 8, 1024, False)
    assert GemvTiling(whole_k=True).blocks(1, 4096, 8192, False) == (False, 1, 16, 512, False)  # too long
    assert GemvTiling().blocks(1, 4096, 1024, False) == (False, 1, 16, 512, True)  # two tiles preloaded
    assert GemvTiling().blocks(8, 4096, 1024, False) == (True, 16, 32, 128, False)  # from 5 rows
    assert GemvTiling(whole_k=True).blocks(8, 4096, 1024, False) == (True, 16, 32, 128, False)
    for bad in [dict(stages=-1), dict(num_warps=3), dict(tile_elems=1000), dict(tile_elems=128)]:
        with pytest.raises(ValueError):
            GemvTiling(**bad)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 6])
def test_fused_gemv_silu_mul(dtype, m):
    t = tensors(m, 80, 24, dtype, seed=m, silu_mul=True, bias=True)
    kw = dict(norm_weight=t["norm_weight"], residual=t["residual"], silu_mul=True)
    got, res = fused_gemv(t["x"], t["weight"], t["bias"], **kw)
    want, want_res = fused_gemv_ref(t["x"], t["weight"], t["bias"], **kw)
    assert got.shape == (m, 24)
    close(got, want, dtype)
    assert torch.equal(res, want_res)


def test_fused_gemv_rejects_what_does_not_fit():
    x = torch.zeros(2, 8, device=DEVICE)
    w = torch.zeros(6, 8, device=DEVICE)
    with pytest.raises(ValueError, match="1 <= M <= 16, got \\(17, 8\\)"):
        fused_gemv(torch.zeros(17, 8, device=DEVICE), w)
    with pytest.raises(ValueError, match="weight must be contiguous \\[N, 8\\]"):
        fused_gemv(x, torch.zeros(6, 9, device=DEVICE))
    with pytest.raises(ValueError, match="weight must be contiguous"):
        fused_gemv(x, w.half())
    with pytest.raises(ValueError, match="silu_mul needs a \\[2N, K\\] weight, got \\(5, 8\\)"):
        fused_gemv(x, torch.zeros(5, 8, device=DEVICE), silu_mul=True)
    with pytest.raises(ValueError, match="bias must be contiguous of shape \\(6,\\)"):
        fused_gemv(x, w, torch.zeros(5, device=DEVICE))
    with pytest.raises(ValueError, match="residual needs norm_weight"):
        fused_gemv(x, w, residual=x)
