#!/usr/bin/env bash
# Engine-speed checks on the device in one call: GPU tests of the changed paths, then W3 (b1/b256
# x 1K, fused/overlap variants), W4, W1 and the core-process overhead (issue 3).
# Usage: bash rollout/benchmarks/gpu_engine.sh [tests|bench|all]
. "$(dirname "$0")/device_setup.sh"
if [ "$what" = tests ] || [ "$what" = all ]; then
  timeout 60 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_fused_ops.py 2>&1 | tail -3
  timeout 170 python3 -m pytest tests -q -x -m gpu -p no:cacheprovider 2>&1 | tee "$out/pytest_gpu.log" | tail -15
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  timeout 130 python3 -m rollout.benchmarks.decode --out "$out" --steps 30 --batches 1 256 --contexts 1024 \
    --variants base fused fused+overlap --no-eager 2>&1 | grep -v '^{' | tail -8
  timeout 60 python3 -m rollout.benchmarks.prefill --out "$out" 2>&1 | tail -1
  timeout 100 python3 -m rollout.benchmarks.throughput --workloads w1 --out "$out" --timeout 90 2>&1 | tail -3
  timeout 120 python3 -m rollout.benchmarks.core_overhead --out "$out" 2>&1 | tail -6
fi
