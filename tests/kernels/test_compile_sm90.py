"""Every Triton kernel the engine launches also compiles to sm_90 (H100/H200) PTX that ptxas
accepts, on this machine without a GPU (see tests/kernels/compile_sm90.py: the real launchers run
on CPU tensors and each launch is compiled instead). The interpreter runs the Python semantics
only; ptxas once refused a load this suite had passed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
KERNELS = {
    "_decode_split_kernel", "_merge_splits_kernel", "_extend_kernel", "_store_kv_kernel",
    "_rms_norm_kernel", "_silu_and_mul_kernel", "_qk_norm_rope_kernel",
    "_partials_kernel", "_merge_kernel", "_noise_kernel", "_gemv_kernel",
}  # fmt: skip


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU run compiles these kernels for real")
def test_every_kernel_launch_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.kernels.compile_sm90"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    failed = [r for r in rows if not r["ok"]]
    assert proc.returncode == 0 and rows and not failed, failed or proc.stderr[-3000:]
    assert {r["kernel"] for r in rows} == KERNELS
    # the in-kernel merge of split decode (two of the six decode launches) counts splits with a
    # GPU-scope acquire-release atomic; nothing else uses atomics
    atomic = [r for r in rows if r["atomics"]]
    assert len(atomic) == 2 and all(r["kernel"] == "_decode_split_kernel" for r in atomic)
    assert all(r["atomics"] == ["atom.global.gpu.acq_rel.add.u32"] for r in atomic)
    # programmatic dependent launch: the decode launches let the next launch start early; those
    # of a small step's chain (pdl=True: decode split + merge and unsplit, each also with q/k norm
    # + RoPE inside, and split + merge preloading their first K/V tile; the final norm, the q/k
    # kernel, half of the GEMVs) also wait for the launch before them
    trigger = ["griddepcontrol.launch_dependents"]
    both = [*trigger, "griddepcontrol.wait"]
    attention = ("_decode_split_kernel", "_merge_splits_kernel")
    decode = [r["griddepcontrol"] for r in rows if r["kernel"] in attention]
    assert decode.count(both) == 8 and decode.count(trigger) == len(decode) - 8 > 0
    for kernel in ("_rms_norm_kernel", "_qk_norm_rope_kernel"):
        flags = [r["griddepcontrol"] for r in rows if r["kernel"] == kernel]
        assert flags.count(both) == 1 and flags.count([]) == len(flags) - 1 > 0, (kernel, flags)
    gemv = [r["griddepcontrol"] for r in rows if r["kernel"] == "_gemv_kernel"]
    assert gemv.count([]) == gemv.count(both) == 10
