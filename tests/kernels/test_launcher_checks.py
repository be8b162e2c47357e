"""Launcher checks found missing by the stop-27 kernel audit: the default decode config fits a
Hopper block's shared memory for every dtype and head dim it accepts (compiled for sm_90 on the
CPU), extend configs and windows the kernels cannot build are refused on the host, q/k norm
weights must be contiguous, and the sampler's default block fits a tiny vocabulary."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rollout.kernels.decode_attention import decode_attention, default_decode_config
from rollout.kernels.fused_ops import qk_norm_rope
from rollout.kernels.prefill_attention import ExtendConfig, extend_attention
from tests.kernels.paged_case import make_case

pytestmark = pytest.mark.usefixtures("triton_interpreter")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROOT = Path(__file__).resolve().parents[2]


# ---- 01: the default decode config fits a Hopper block's shared memory ------------------------
def test_default_decode_config_narrows_wide_fp32_tiles():
    cpu = torch.device("cpu")
    assert default_decode_config(1, 8, cpu, head_dim=256, itemsize=4).block_n == 64
    assert default_decode_config(1, 8, cpu, head_dim=128, itemsize=4).block_n == 128
    assert default_decode_config(1, 8, cpu, head_dim=256, itemsize=2).block_n == 128


_SMEM_PROBE = r"""
import torch, triton
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction
from tests.kernels import compile_sm90 as C
shared = []
def run(self, *args, grid, warmup, **kw):
    opts = {k: kw.pop(k) for k in C._OPTIONS if k in kw}
    vals = dict(zip(self.arg_names, args, strict=False)) | kw
    sig, cex = {}, {}
    for i, p in enumerate(self.params):
        v = vals.get(p.name, p.default)
        if p.is_constexpr:
            sig[p.name] = "constexpr"; cex[(i,)] = v
        else:
            sig[p.name] = C._type(v)
    k = triton.compile(ASTSource(fn=self, signature=sig, constexprs=cex), target=C._TARGET, options=opts)
    shared.append(k.metadata.shared)
JITFunction.run = run
"""
_DECODE_LAUNCHES = r"""
from rollout.kernels.decode_attention import decode_attention
for dtype in (torch.float32, torch.bfloat16):
    for dim in (64, 128, 256):
        for batch in (1, 256):
            kc = torch.zeros(4, 16, 2, dim, dtype=dtype)
            tables = torch.zeros(batch, 2, dtype=torch.int32)
            lens = torch.full((batch,), 20, dtype=torch.int32)
            decode_attention(torch.zeros(batch, 4, dim, dtype=dtype), kc, kc.clone(), tables, lens, 0.1)
print(max(shared))
"""
# The gate/up (norm + residual + SiLU-and-mul) and down GEMVs of Qwen3-0.6B at the row counts that
# pick each tiling: broadcast multiply-sum at 1-4 rows, 16-row tensor-core tiles above.
_GEMV_LAUNCHES = r"""
from rollout.kernels.gemv import GemvTiling, fused_gemv
for dtype in (torch.float32, torch.bfloat16):
    for rows in (1, 2, 4, 16):
        for tiling in (GemvTiling(), GemvTiling(whole_k=True)):
            x, g = torch.zeros(rows, 1024, dtype=dtype), torch.ones(1024, dtype=dtype)
            up = torch.zeros(6144, 1024, dtype=dtype)
            fused_gemv(x, up, norm_weight=g, residual=x.clone(), silu_mul=True, tiling=tiling)
            down = torch.zeros(1024, 3072, dtype=dtype)
            fused_gemv(torch.zeros(rows, 3072, dtype=dtype), down, tiling=tiling)
print(max(shared))
"""


def max_shared_sm90(launches: str) -> int:
    """The most shared memory any kernel that ``launches`` (a script) starts needs on sm_90."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", _SMEM_PROBE + launches], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return int(proc.stdout.split()[-1])


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only sm_90 compile")
def test_default_decode_launches_fit_hopper_shared_memory():
    assert max_shared_sm90(_DECODE_LAUNCHES) <= 232448  # H100/H200 per-block opt-in limit


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only sm_90 compile")
def test_gemv_tilings_fit_hopper_shared_memory():
    """Every GemvTiling the engine can pick, fp32 and bf16 (a whole-K tensor-core tiling tried in
    stop 28 needed 466,944 bytes at 6-16 rows in fp32 and failed on the H200 only)."""
    assert max_shared_sm90(_GEMV_LAUNCHES) <= 232448


# ---- 02: launch configs and windows are checked on the host ----------------------------------
@pytest.mark.parametrize("config", [ExtendConfig(16, 8), ExtendConfig(48, 16), ExtendConfig(16, 24)])
def test_extend_rejects_configs_it_cannot_build(config):
    case = make_case([5, 3], [2, 3], 4, 2, 16, 4, torch.float32, DEVICE, seed=5)
    args = (
        case.q,
        case.k_cache,
        case.v_cache,
        case.block_tables,
        case.seq_lens,
        case.query_start_loc,
        3,
        0.25,
    )
    with pytest.raises(ValueError, match="bad extend config"):
        extend_attention(*args, config=config)


@pytest.mark.parametrize("window", [2.5, True])
def test_attention_rejects_non_int_windows(window):
    case = make_case([5, 3], [1, 1], 4, 2, 16, 4, torch.float32, DEVICE, seed=5)
    with pytest.raises(ValueError, match="sliding_window"):
        decode_attention(case.q, case.k_cache, case.v_cache, case.block_tables, case.seq_lens, 0.25, window)


# ---- 03: q/k norm weights must be contiguous (the kernels index them as w_ptr + d) -------------
def test_qk_norm_rope_rejects_strided_norm_weights():
    qkv = torch.randn(3, 8 * 16, device=DEVICE)
    pos = torch.arange(3, device=DEVICE)
    table = torch.randn(8, 16, device=DEVICE)
    w = torch.randn(16, 2, device=DEVICE)[:, 0]  # shape (16,), stride (2,)
    with pytest.raises(ValueError, match="q_weight"):
        qk_norm_rope(qkv, pos, table, 4, 2, 16, w, w.contiguous())
    with pytest.raises(ValueError, match="positions"):
        qk_norm_rope(qkv, pos.float(), table, 4, 2, 16)


# ---- 04: a vocabulary under 16 gets a block the kernel accepts -------------------------------
def test_fused_sample_default_block_fits_a_tiny_vocabulary():
    """V = 8: the default block (the vocabulary rounded up to a power of two) was 8, under the
    kernel's minimum, and the call raised about a block_size the caller never gave."""
    from rollout.kernels.sampling import fused_sample

    b, v = 2, 8
    logits = torch.randn(b, v, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    i64 = dict(dtype=torch.long, device=DEVICE)
    args = (
        logits, torch.ones(b, device=DEVICE), torch.ones(b, dtype=torch.bool, device=DEVICE),
        torch.zeros(b, **i64), torch.zeros(b, **i64), torch.zeros(b, dtype=torch.bool, device=DEVICE),
        torch.zeros(0, **i64), torch.zeros(0, **i64),
    )  # fmt: skip
    out = fused_sample(*args, all_greedy=True, any_processed=False)
    assert torch.equal(out.token_ids, logits.argmax(-1))
