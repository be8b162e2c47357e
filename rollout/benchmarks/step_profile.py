"""Where a steady decode step's time goes on the GPU: wall time per step against the time the GPU is
busy (union of kernel and copy intervals from the torch profiler), kernels and runtime calls per
step, and the kernels that take the most time.

    rollout bench step_profile --batches 1 256 --context 1024 --out $OUT

Busy well under wall means the GPU waits on the host (launch gaps, Python); busy near wall means the
kernels themselves are the cost. One Chrome trace per batch lands in ``--out`` (gzip). On CUDA it
also times the host side of launching the step's graph alone, idle and queued behind itself.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import rollout.model_runner as model_runner
from rollout import LLM, SamplingParams
from rollout.benchmarks.common import (
    PhaseTimer,
    add_graph_args,
    export_trace,
    gpu_trace_summary,
    graph_config,
    print_gpu_summary,
    prompts_pending,
)
from rollout.engine import EngineCore


def launch_host_ms(replay: Callable[[], None], sync: Callable[[], None], n: int = 20) -> tuple[float, float]:
    """Median host time (ms) of one ``replay`` call with the device idle, and with the previous
    replay (of the same graph) still running: whether launching a graph costs the host more when
    it is queued behind itself, as in the overlapped loop."""
    idle, behind = [], []
    for _ in range(n):
        sync()
        t = time.perf_counter()
        replay()
        idle.append(time.perf_counter() - t)
    sync()
    replay()
    for _ in range(n):
        t = time.perf_counter()
        replay()
        behind.append(time.perf_counter() - t)
    sync()
    return statistics.median(idle) * 1e3, statistics.median(behind) * 1e3


_INSIDE_LAUNCH = ("sampling_rows", "prepare", "replay", "sampling_tensors", "sample", "sampler_graph")


def host_phases(engine: EngineCore, timer: PhaseTimer) -> contextlib.AbstractContextManager[None]:
    """Time the host side of a step's calls into ``timer`` while inside: the engine's schedule,
    launch, collect (which waits for the step in flight) and process, and within launch the
    sampling rows, the input preparation, the sampling tensors, the eager sampler or the sampler
    graph, and the decode graph replay (input copies, or the one staging copy with
    RunnerConfig.graph_inputs, + cudaGraphLaunch). Restored on exit."""
    runner = engine.runner
    calls = [(engine.scheduler, "schedule", "schedule"), (runner, "launch", "launch")]
    calls += [(runner, "collect", "collect"), (engine, "_process", "process")]
    calls += [(runner, "_sampling_rows", "sampling_rows"), (runner, "_prepare", "prepare")]
    calls += [(runner, "_sampling_tensors", "sampling_tensors")]
    calls += [(model_runner, "sample", "sample")]  # the eager sampler, as launch calls it
    if runner.graphs is not None:
        calls.append((runner.graphs, "replay", "replay"))
        calls.append((runner.graphs, "replay_staged", "replay"))
    if runner.sampler_graphs is not None:
        calls.append((runner.sampler_graphs, "replay", "sampler_graph"))
    return timer.timing(calls)


def start_decode(llm: LLM, batch: int, context: int, rng: random.Random) -> list[str]:
    """Admit ``batch`` requests of ``context`` prompt tokens and step until all decode."""
    engine = llm.engine
    ids = [f"p{batch}-{context}-{i}-{rng.random()}" for i in range(batch)]
    vocab = engine.model_config.vocab_size
    # room to the model's limit: the first admitted requests decode while later ones still prefill
    # (a 256 x 4K batch takes ~128 admission steps); they are aborted after the profile anyway
    max_tokens = engine.max_total_tokens - context
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=1.0, seed=0)
    for rid in ids:
        engine.add_request(rid, [rng.randrange(3, min(10000, vocab)) for _ in range(context)], params)
    while prompts_pending(engine.scheduler):
        engine.step()
    for _ in range(3):
        engine.step()
    return ids


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="rollout bench step_profile")
    p.add_argument("--model", default="qwen3-0.6b")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 256])
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--no-overlap", action="store_true", help="the plain loop instead of the overlapped")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    add_graph_args(p)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    llm = LLM(args.model, load_format="dummy", device=args.device, runner_config=graph_config(args))
    engine = llm.engine
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    engine.overlap = engine.overlap and not args.no_overlap
    rng = random.Random(0)
    rows = []
    for batch in args.batches:
        ids = start_decode(llm, batch, args.context, rng)
        graphs = engine.runner.graphs
        timer = PhaseTimer()
        with host_phases(engine, timer):
            sync()
            t = time.perf_counter()
            for _ in range(args.steps):
                engine.step()
            sync()
        wall_ms = (time.perf_counter() - t) / args.steps * 1e3
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                engine.step()
            sync()
        if len(engine.scheduler.running) != batch:
            raise RuntimeError(
                f"a sequence finished while profiled ({len(engine.scheduler.running)} of {batch})"
            )
        launch = None
        size = graphs.padded_size(batch) if graphs is not None and graphs.captured else None
        if size is not None:  # the step's graph alone: it rewrites the last step's KV slots with the
            # same values (same static inputs), and the requests are aborted next
            launch = (size, *launch_host_ms(graphs.graphs[size].replay, sync))
        engine.abort(ids)
        raw = export_trace(prof)
        (out / f"trace_b{batch}.json.gz").write_bytes(gzip.compress(raw))
        host_ms = {k: v / args.steps * 1e3 for k, v in timer.seconds.items()}
        row = dict(
            batch=batch,
            context=args.context,
            overlap=engine.overlap,
            wall_ms_per_step=wall_ms,
            graph_replay_host_ms=host_ms.get("replay", 0.0),
            host_ms=host_ms,
            graph_launch_host_ms=None
            if launch is None
            else dict(rows=launch[0], idle=launch[1], behind=launch[2]),
        )
        row.update(gpu_trace_summary(json.loads(raw), per=args.steps))
        rows.append(row)
        print(
            f"batch {batch:4}: wall {wall_ms:6.3f} ms/step, GPU busy {row['gpu_busy_us'] / 1e3:6.3f} ms,"
            f" span {row['gpu_span_us'] / 1e3:6.3f} ms, {row['gpu_ops']:.0f} GPU ops/step,"
            f" runtime {row['runtime_us'] / 1e3:.3f} ms, replay call {row['graph_replay_host_ms']:.3f} ms",
            flush=True,
        )
        ms = row["host_ms"]
        inner = ", ".join(f"{k} {ms[k]:.3f}" for k in _INSIDE_LAUNCH if k in ms)
        print(
            f"    host ms/step by call: schedule {ms['schedule']:.3f}, launch {ms['launch']:.3f} ({inner}),"
            f" collect {ms['collect']:.3f} (waits for the step in flight), process {ms['process']:.3f}"
        )
        if launch is not None:
            size, idle, behind = launch
            print(f"    graph of {size} rows alone: launch {idle:.3f} ms idle, {behind:.3f} ms behind itself")
        print_gpu_summary(row, "/step")
    (out / "step_profile.json").write_text(json.dumps(rows, indent=1))
    llm.shutdown()


if __name__ == "__main__":
    main()
