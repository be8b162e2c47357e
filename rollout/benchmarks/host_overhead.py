"""Issue 4: the engine's host work per decode step, phase by phase.

Small decode batches on the GPU are host-bound: the step takes as long as the Python that
schedules it, builds its inputs and sampling tensors, and applies its results. This bench times
each phase of ``EngineCore.step_outputs`` on a steady decode batch (every request past its prompt,
fresh prompts, no EOS) by wrapping the engine's own methods with a timer.

On CUDA every phase is host time (the forward, logits and sampling only launch kernels; ``collect``
includes the wait for the step). On the CPU the forward, logits and sampling run synchronously, so
they are device compute: the ``host`` line leaves them out and sums the rest (``other`` is the
step's own code between the timed phases), which is the Python this bench exists to measure. It
runs on the CPU in a few seconds:

    python -m rollout.benchmarks.host_overhead --device cpu --model tiny --batches 1 32 256
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from collections.abc import Mapping
from pathlib import Path

import torch

from rollout.benchmarks.common import PhaseTimer, cprofile_text, prompts_pending
from rollout.config import SchedulerConfig
from rollout.engine import EngineCore
from rollout.samplers.params import SamplingParams

# Phases that are device compute when the engine runs on the CPU (launches on CUDA).
_DEVICE_PHASES = ("forward", "logits", "sample")


def _timed_calls(engine: EngineCore) -> list[tuple[object, str, str]]:
    """(owner, attribute, phase) of every call this bench times (``PhaseTimer.timing``)."""
    import rollout.model_runner as model_runner

    runner, sched = engine.runner, engine.scheduler
    return [
        (sched, "schedule", "schedule"),
        (sched, "update_computed", "update_computed"),
        (runner, "_sampling_rows", "sampling_rows"),
        (runner, "_prepare", "prepare"),
        (runner, "_to_device", "to_device"),
        (runner.model, "forward", "forward"),
        (runner.model, "compute_logits", "logits"),
        (model_runner, "sample", "sample"),
        (runner, "collect", "collect"),
        (engine, "_process", "process"),
        (engine, "_new_token_only", "new_token_only"),
        (runner, "_sampling_tensors", "sampling_tensors"),
    ]


def _phases_ms(seconds: Mapping[str, float], steps: int, total: float) -> dict[str, float]:
    """Milliseconds per step of each timed phase, largest first, and ``other``: the rest of the
    ``total`` seconds (the step's own code between the timed phases, host time too)."""
    phases = {k: v / steps * 1e3 for k, v in sorted(seconds.items(), key=lambda kv: -kv[1])}
    phases["other"] = total / steps * 1e3 - sum(phases.values())
    return phases


def _print_phases(phases: dict[str, float], device: torch.device, batch: int | None = None) -> None:
    """One line per phase: ms per step (and us per sequence of ``batch``); CPU-compute phases marked."""
    for name, ms in phases.items():
        mark = " (device)" if name in _DEVICE_PHASES and device.type != "cuda" else ""
        per = f"  {ms / batch * 1e3:7.2f} us/seq" if batch else "/step"
        print(f"    {name:17} {ms:7.3f} ms{per}{mark}")


def measure(
    engine: EngineCore,
    timer: PhaseTimer,
    batch: int,
    steps: int,
    seed: int,
    api: str,
    sampling: dict,
    prompt_len: tuple[int, int] = (16, 64),
) -> dict:
    """Per-step phase times of ``steps`` decode steps at ``batch`` sequences, each one a call of
    ``engine.<api>()``: ``step_outputs`` (what the engine core process runs) or ``step`` (the
    in-process ``LLM``)."""
    step = getattr(engine, api)
    rng = random.Random(seed)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(**{"max_tokens": steps + 64, "ignore_eos": True, "temperature": 1.0, **sampling})
    ids = [f"b{batch}-{i}" for i in range(batch)]
    for rid in ids:
        prompt = [rng.randrange(vocab) for _ in range(rng.randrange(*prompt_len))]
        engine.add_request(rid, prompt, params)
    while prompts_pending(engine.scheduler):
        engine.step_outputs()
    for _ in range(5):  # warm: the batch's first decode steps, kernel caches
        engine.step_outputs()
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    sync()
    timer.seconds.clear()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    total = time.perf_counter() - t
    engine.abort(ids)
    phases = _phases_ms(timer.seconds, steps, total)
    host = sum(v for k, v in phases.items() if k not in _DEVICE_PHASES or engine.device.type == "cuda")
    return dict(
        batch=batch,
        api=api,
        sampling=sampling,
        steps=steps,
        device=str(engine.device),
        step_ms=total / steps * 1e3,
        host_ms=host,
        host_us_per_seq=host / batch * 1e3,
        phases_ms=phases,
    )


def measure_admission(
    engine: EngineCore, timer: PhaseTimer, num_prompts: int, prompt_len: tuple[int, int], seed: int
) -> dict:
    """Per-step phase times of the admission phase: ``num_prompts`` prompts of ``prompt_len`` tokens
    added at once (as W1 does) and stepped until every prompt is in the KV cache. These steps run
    eagerly (no graph), a budget of prompt tokens each, plus the decodes of requests already in."""
    rng = random.Random(seed)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(max_tokens=4096, ignore_eos=True, temperature=1.0)
    ids = [f"a{seed}-{i}" for i in range(num_prompts)]
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(*prompt_len))] for _ in ids]
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    sync()
    timer.seconds.clear()
    t = time.perf_counter()
    for rid, prompt in zip(ids, prompts, strict=True):
        engine.add_request(rid, prompt, params)
    added = time.perf_counter() - t
    steps = 0
    sched = engine.scheduler
    while prompts_pending(sched):
        engine.step_outputs()
        steps += 1
    sync()
    total = time.perf_counter() - t
    engine.abort(ids)
    phases = _phases_ms({**timer.seconds, "add_request": added}, steps, total)
    return dict(
        admission=num_prompts,
        prompt_len=list(prompt_len),
        prompt_tokens=sum(map(len, prompts)),
        steps=steps,
        device=str(engine.device),
        step_ms=total / steps * 1e3,
        phases_ms=phases,
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="rollout bench host_overhead")
    p.add_argument("--model", default="tiny")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--load-format", default="auto")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32, 256])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--api", choices=["step_outputs", "step"], default="step_outputs")
    p.add_argument(
        "--sampling", type=json.loads, default={}, help="SamplingParams fields, e.g. '{\"top_k\": 50}'"
    )
    p.add_argument("--prompt-len", type=int, nargs=2, default=[16, 64], help="range of prompt lengths")
    p.add_argument(
        "--admission",
        type=int,
        default=0,
        help="also time the admission phase of this many prompts of --prompt-len tokens, added at once",
    )
    p.add_argument("--max-batched", type=int, default=8192, help="token budget of one step")
    p.add_argument(
        "--cprofile", type=int, default=0, help="cProfile the admission phase; print this many functions"
    )
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (CPU runs)")
    p.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    engine = EngineCore(
        args.model,
        device=args.device,
        load_format=args.load_format,
        scheduler_config=SchedulerConfig(
            max_num_seqs=max(args.batches + [args.admission]), max_num_batched_tokens=args.max_batched
        ),
    )
    timer = PhaseTimer()
    with timer.timing(_timed_calls(engine)):  # the module's sampler put back after (tests run on)
        rows = _run(args, engine, timer)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "host_overhead.json").write_text(json.dumps(rows, indent=1))


def _run(args: argparse.Namespace, engine: EngineCore, timer: PhaseTimer) -> list[dict]:
    rows = []
    for batch in args.batches:
        rows.append(
            measure(engine, timer, batch, args.steps, batch, args.api, args.sampling, args.prompt_len)
        )
        r = rows[-1]
        print(
            f"batch {batch:4}: step {r['step_ms']:7.3f} ms, host {r['host_ms']:6.3f} ms "
            f"({r['host_us_per_seq']:6.2f} us/seq)",
            flush=True,
        )
        _print_phases(r["phases_ms"], engine.device, batch)
    if args.admission:
        prof = None
        if args.cprofile:  # where the admission steps' host time goes, function by function
            import cProfile

            prof = cProfile.Profile()
            prof.enable()
        r = measure_admission(engine, timer, args.admission, tuple(args.prompt_len), seed=1)
        if prof is not None:
            prof.disable()
            text = cprofile_text(prof, args.cprofile)
            Path(args.out).mkdir(parents=True, exist_ok=True)
            Path(args.out, "admission_cprofile.txt").write_text(text)
            print(text)
        rows.append(r)
        print(
            f"admission of {r['admission']} prompts ({r['prompt_tokens']} tokens): {r['steps']} steps,"
            f" {r['step_ms']:7.3f} ms/step",
            flush=True,
        )
        _print_phases(r["phases_ms"], engine.device)
    return rows


if __name__ == "__main__":
    main()
