"""Shared pieces of the benchmarks: device ceilings and the model's byte counts."""

from __future__ import annotations

import time

import torch


def measure_ceilings() -> dict:
    """Copy bandwidth (bytes read + written per second) and bf16 matmul rate of this GPU."""
    x = torch.empty(1 << 30, dtype=torch.bfloat16, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    bw = 2 * x.numel() * 2 / ((time.perf_counter() - t) / 10)
    del x, y
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn_like(a)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    flops = 2 * 8192**3 / ((time.perf_counter() - t) / 10)
    return {"copy_bytes_per_s": bw, "matmul_flop_per_s": flops, "device": torch.cuda.get_device_name()}


def model_bytes(llm) -> tuple[int, int]:
    """(weight bytes, KV bytes per token) of an LLM's model."""
    mc = llm.engine.model_config
    kv_per_token = 2 * mc.num_layers * mc.num_kv_heads * mc.head_dim * mc.dtype.itemsize
    weights = sum(p.numel() * p.element_size() for p in llm.engine.runner.model.parameters())
    return weights, kv_per_token
