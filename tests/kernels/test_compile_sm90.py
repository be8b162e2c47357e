"""The Triton kernels that the interpreter tests on CPU also compile to sm_90 (H100/H200) PTX that
ptxas accepts, on this machine without a GPU (see tests/kernels/compile_sm90.py): the interpreter
runs the Python semantics only, and ptxas once refused a load this suite had passed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU run compiles these kernels for real")
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.kernels.compile_sm90"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    failed = [r for r in rows if not r["ok"]]
    assert proc.returncode == 0 and not failed, failed or proc.stderr[-3000:]
    names = {r["name"] for r in rows}
    assert {"merge", "extend_tiles", "prefetch"} <= names and len(rows) == 6
    for r in rows:  # the in-kernel merge counts splits with a GPU-scope acquire-release atomic
        fused = r["name"].endswith("fused1")
        assert (r["atomics"] == ["atom.global.gpu.acq_rel.add.u32"]) == fused, r
