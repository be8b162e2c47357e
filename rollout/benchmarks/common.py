"""Shared pieces of the benchmarks: device ceilings and the model's byte counts."""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch

from rollout.config import RunnerConfig


def add_graph_args(parser: argparse.ArgumentParser) -> None:
    """``--piecewise-tokens`` / ``--mixed-graph-tokens`` / ``--fused-merge`` /
    ``--gemv-rows`` / ``--gemv-pdl`` / ``--decode-rope`` / ``--decode-preload`` / ``--decode-pdl`` /
    ``--gemv-whole-k`` / ``--gemv-stages`` / ``--graph-sampling`` / ``--graph-inputs``: how the engine
    under test runs its steps (``RunnerConfig.max_piecewise_tokens`` / ``max_mixed_graph_tokens`` /
    ``fused_decode_merge`` / ``small_batch_gemv_rows`` / ``small_batch_gemv_pdl`` /
    ``small_batch_decode_rope`` / ``small_batch_decode_preload`` / ``decode_attention_pdl`` /
    ``small_batch_gemv_whole_k`` / ``small_batch_gemv_stages`` / ``graph_sampling`` /
    ``graph_inputs``)."""
    defaults = RunnerConfig()
    parser.add_argument(
        "--piecewise-tokens",
        type=int,
        default=defaults.max_piecewise_tokens,
        help="RunnerConfig.max_piecewise_tokens (0: no piecewise graphs)",
    )
    parser.add_argument(
        "--mixed-graph-tokens",
        type=int,
        default=defaults.max_mixed_graph_tokens,
        help="RunnerConfig.max_mixed_graph_tokens (0: no whole mixed-step graphs)",
    )
    parser.add_argument(
        "--fused-merge", action="store_true", help="RunnerConfig.fused_decode_merge (in-kernel split merge)"
    )
    parser.add_argument(
        "--gemv-rows",
        type=int,
        default=defaults.small_batch_gemv_rows,
        help="RunnerConfig.small_batch_gemv_rows (steps of at most this many rows: fused GEMVs)",
    )
    parser.add_argument(
        "--gemv-pdl",
        action=argparse.BooleanOptionalAction,
        default=defaults.small_batch_gemv_pdl,
        help="RunnerConfig.small_batch_gemv_pdl (those GEMVs as programmatic dependent launches)",
    )
    parser.add_argument(
        "--decode-rope",
        action=argparse.BooleanOptionalAction,
        default=defaults.small_batch_decode_rope,
        help="RunnerConfig.small_batch_decode_rope (small decode steps: q/k norm + RoPE in the attention)",
    )
    parser.add_argument(
        "--decode-preload",
        action=argparse.BooleanOptionalAction,
        default=defaults.small_batch_decode_preload,
        help="RunnerConfig.small_batch_decode_preload (those steps: first K/V tile loaded before the wait)",
    )
    parser.add_argument(
        "--decode-pdl",
        action=argparse.BooleanOptionalAction,
        default=defaults.decode_attention_pdl,
        help="RunnerConfig.decode_attention_pdl (decode steps: q/k kernel, attention as dependent launches)",
    )
    parser.add_argument(
        "--gemv-whole-k",
        action=argparse.BooleanOptionalAction,
        default=defaults.small_batch_gemv_whole_k,
        help="RunnerConfig.small_batch_gemv_whole_k (small-batch GEMVs: all of K in one tile a program)",
    )
    parser.add_argument(
        "--gemv-stages",
        type=int,
        default=defaults.small_batch_gemv_stages,
        help="RunnerConfig.small_batch_gemv_stages (small-batch GEMVs: software-pipelined loop; 0: plain)",
    )
    parser.add_argument(
        "--graph-sampling",
        action=argparse.BooleanOptionalAction,
        default=defaults.graph_sampling,
        help="RunnerConfig.graph_sampling (decode graph steps sample in a CUDA graph of their own)",
    )
    parser.add_argument(
        "--graph-inputs",
        action=argparse.BooleanOptionalAction,
        default=defaults.graph_inputs,
        help="RunnerConfig.graph_inputs (decode graph steps: one input copy, unpacked in the graph)",
    )


def graph_argv(args: argparse.Namespace) -> list[str]:
    """``add_graph_args``' options as they were given, for a child process's command line."""
    onoff = lambda flag, on: f"--{flag}" if on else f"--no-{flag}"
    return [
        *(
            "--piecewise-tokens",
            str(args.piecewise_tokens),
            "--mixed-graph-tokens",
            str(args.mixed_graph_tokens),
        ),
        *(["--fused-merge"] if args.fused_merge else []),
        *("--gemv-rows", str(args.gemv_rows), onoff("gemv-pdl", args.gemv_pdl)),
        onoff("decode-rope", args.decode_rope),
        onoff("decode-preload", args.decode_preload),
        onoff("decode-pdl", args.decode_pdl),
        onoff("gemv-whole-k", args.gemv_whole_k),
        *("--gemv-stages", str(args.gemv_stages)),
        onoff("graph-sampling", args.graph_sampling),
        onoff("graph-inputs", args.graph_inputs),
    ]


def graph_config(args: argparse.Namespace) -> RunnerConfig:
    """The RunnerConfig of ``add_graph_args``' options."""
    return RunnerConfig(
        max_piecewise_tokens=args.piecewise_tokens,
        max_mixed_graph_tokens=args.mixed_graph_tokens,
        fused_decode_merge=args.fused_merge,
        small_batch_gemv_rows=args.gemv_rows,
        small_batch_gemv_pdl=args.gemv_pdl,
        small_batch_decode_rope=args.decode_rope,
        small_batch_decode_preload=args.decode_preload,
        decode_attention_pdl=args.decode_pdl,
        small_batch_gemv_whole_k=args.gemv_whole_k,
        small_batch_gemv_stages=args.gemv_stages,
        graph_sampling=args.graph_sampling,
        graph_inputs=args.graph_inputs,
    )


def graph_ms(fn: Callable[[Any], object], items: Sequence[Any]) -> float:
    """Median milliseconds per call of ``fn(item)``, every item's call captured in one CUDA graph
    (calls over disjoint copies of a problem: none is served from L2 left by the one before)."""
    from triton.testing import do_bench

    for item in items:  # compile outside the capture
        fn(item)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for item in items:
            fn(item)
    return do_bench(graph.replay, warmup=25, rep=100, return_mode="median") / len(items)


def copy_bytes_per_s() -> float:
    """This GPU's copy bandwidth: bytes read + written per second by a 2 GiB device copy."""
    x = torch.empty(1 << 30, dtype=torch.bfloat16, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    return 2 * x.numel() * 2 / ((time.perf_counter() - t) / 10)


def measure_ceilings() -> dict:
    """Copy bandwidth (bytes read + written per second) and bf16 matmul rate of this GPU."""
    bw = copy_bytes_per_s()
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
    """(weight bytes a decode step reads, KV bytes per token) of an LLM's model. An untied input
    embedding is left out: a step reads only its rows' embeddings, not the table (a tied one is
    the LM head, read whole, and ``parameters()`` yields it once)."""
    mc = llm.engine.model_config
    kv_per_token = 2 * mc.num_layers * mc.num_kv_heads * mc.head_dim * mc.dtype.itemsize
    model = llm.engine.runner.model
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    if not model.spec.tie_word_embeddings:
        table = model.model.embed_tokens.weight
        weights -= table.numel() * table.element_size()
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


GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")


def busy_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals (the time a stream had work)."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def gpu_trace_summary(trace: dict, per: float = 1.0, top: int = 15) -> dict:
    """From a torch profiler Chrome trace: GPU busy time (union of kernel/copy intervals), span, op
    count, CUDA runtime calls and the ``top`` kernels by time, each divided by ``per`` (steps)."""
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    gpu = [e for e in events if e.get("cat") in GPU_CATS]
    runtime = [e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver")]
    by_kernel: dict[str, list[float]] = collections.defaultdict(list)
    for e in gpu:
        by_kernel[e["name"][:90]].append(e["dur"])
    calls: dict[str, int] = collections.defaultdict(int)
    for e in runtime:
        calls[e["name"]] += 1
    span = (max(e["ts"] + e["dur"] for e in gpu) - min(e["ts"] for e in gpu)) if gpu else 0.0
    ranked = sorted(by_kernel.items(), key=lambda kv: -sum(kv[1]))[:top]
    return dict(
        gpu_busy_us=busy_us([(e["ts"], e["ts"] + e["dur"]) for e in gpu]) / per,
        gpu_span_us=span / per,
        gpu_ops=len(gpu) / per,
        runtime_calls={k: v / per for k, v in sorted(calls.items(), key=lambda kv: -kv[1])[:8]},
        runtime_us=sum(e["dur"] for e in runtime) / per,
        top_kernels=[dict(name=k, count=len(v) / per, us=sum(v) / per) for k, v in ranked],
    )


def export_trace(prof) -> bytes:
    """A finished ``torch.profiler.profile``'s Chrome trace, as JSON bytes."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "trace.json")
        prof.export_chrome_trace(str(path))
        return path.read_bytes()


def print_gpu_summary(s: dict, unit: str) -> None:
    for name, n in s["runtime_calls"].items():
        print(f"    {n:9.1f}{unit}  {name}")
    for k in s["top_kernels"]:
        print(f"    {k['us']:9.1f} us{unit}  {k['count']:7.1f}x  {k['name']}")


def prompts_pending(scheduler) -> bool:
    """Whether a prompt is still waiting or only partly in the KV cache (admission not over)."""
    return bool(scheduler.waiting) or any(r.in_prefill for r in scheduler.running)


def cprofile_text(prof, lines: int) -> str:
    """A stopped ``cProfile.Profile``'s ``lines`` functions with the most own time, as text."""
    import io
    import pstats

    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(lines)
    return text.getvalue()


def step_kinds(llm: Any) -> list[tuple[float, bool, int]]:
    """Record, per engine step, (end time, whether the batch it collected was decode-only (a graph
    replay on CUDA) or had prompt tokens (a mixed step), tokens in that batch).

    A step is timed by the batch it collects, not the one it launches: with the overlapped loop a
    step launches batch N+1 and then waits for batch N, so its wall time is N's device time when
    the device is the bottleneck. (Timed by the launched batch, each mixed step's device time
    landed in the decode step after it: W2's decode steps looked 0.3 ms slower with mixed graphs,
    which the steady decode step of `rollout bench step_profile` did not show.)"""
    engine = llm.engine
    collect, step = engine.runner.collect, engine.step
    steps: list[tuple[float, bool, int]] = []
    collected: list[tuple[bool, int]] = []

    def traced_collect(handle):
        batch = handle.batch
        collected.append((batch.num_tokens == len(batch.requests), batch.num_tokens))
        return collect(handle)

    def traced_step():
        out = step()
        decode_only, tokens = collected.pop() if collected else (True, 0)
        collected.clear()
        steps.append((time.perf_counter(), decode_only, tokens))
        return out

    engine.runner.collect = traced_collect
    engine.step = traced_step
    return steps


class PhaseTimer:
    """Wall time spent in wrapped callables, by phase name."""

    def __init__(self) -> None:
        self.seconds: collections.Counter[str] = collections.Counter()

    def timed(self, fn: Callable[..., Any], phase: str) -> Callable[..., Any]:
        """``fn``, adding the wall time of each call to ``phase``."""
        seconds = self.seconds

        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds[phase] += time.perf_counter() - t

        return timed

    def timing(self, calls: Iterable[tuple[Any, str, str]]) -> contextlib.AbstractContextManager[None]:
        """Each ``(owner, attr, phase)``'s attribute ``timed`` into ``phase`` while inside (an
        attribute listed twice is timed in both phases), every original back on exit (``patched``)."""
        return patched(
            [(owner, attr, functools.partial(self.timed, phase=phase)) for owner, attr, phase in calls]
        )


@contextlib.contextmanager
def patched(replacements: Iterable[tuple[Any, str, Callable[[Any], Any]]]) -> Iterator[None]:
    """For each ``(owner, attr, make)`` in order, set ``owner.attr = make(owner.attr)`` while
    inside, and put every original back on exit: the owner's own attribute (a module's function, a
    class's method) or, where the owner had none of its own (an instance's method), none again."""
    replacements = list(replacements)
    saved = [(owner, attr, vars(owner).get(attr)) for owner, attr, _ in replacements]
    for owner, attr, make in replacements:
        setattr(owner, attr, make(getattr(owner, attr)))
    try:
        yield
    finally:
        for owner, attr, own in reversed(saved):
            if own is None:
                delattr(owner, attr)
            else:
                setattr(owner, attr, own)
