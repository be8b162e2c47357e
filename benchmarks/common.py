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


class GcStats:
    """Counts and times the cyclic garbage collector's passes while installed (``with GcStats() as g``):
    full collections over a large unfrozen heap are a hidden per-step cost of a Python engine loop."""

    def __init__(self) -> None:
        self.count = [0, 0, 0]
        self.seconds = [0.0, 0.0, 0.0]
        self._start = 0.0

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            gen = info["generation"]
            self.count[gen] += 1
            self.seconds[gen] += time.perf_counter() - self._start

    def __enter__(self) -> GcStats:
        import gc

        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        import gc

        gc.callbacks.remove(self._callback)

    def summary(self) -> dict:
        import gc

        return {
            "collections": self.count,
            "ms": [round(s * 1e3, 1) for s in self.seconds],
            "frozen_objects": gc.get_freeze_count(),
            "tracked_objects": len(gc.get_objects()),
        }


class KernelCompiles:
    """Records each Triton kernel specialization this process builds (or loads from Triton's disk
    cache) while installed, with its time: a kernel that meets a new specialization mid-run (an int
    argument's divisibility by 16, a pointer's alignment) stalls the engine loop for the compile."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, float]] = []  # (kernel, specialization key, ms)
        self._orig = None

    def __enter__(self) -> KernelCompiles:
        from triton.runtime.jit import JITFunction

        orig = self._orig = JITFunction._do_compile
        events = self.events

        def timed(fn, key, *args, **kwargs):
            t = time.perf_counter()
            try:
                return orig(fn, key, *args, **kwargs)
            finally:
                events.append((fn.__name__, str(key)[:300], (time.perf_counter() - t) * 1e3))

        JITFunction._do_compile = timed
        return self

    def __exit__(self, *exc: object) -> None:
        from triton.runtime.jit import JITFunction

        JITFunction._do_compile = self._orig

    def summary(self) -> dict:
        return {
            "count": len(self.events),
            "ms": round(sum(e[2] for e in self.events), 1),
            "events": [[name, round(ms, 1), key] for name, key, ms in self.events],
        }
