"""Offline throughput (W1 of BENCHMARKS.md, and the HF peer's workload) for rollout-engine and the
HF transformers continuous-batching peer, each in its own subprocess of one run.

    rollout bench throughput --model qwen3-0.6b --workloads w1 peer256 --peer hf --out $OUT
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from rollout.benchmarks.common import (
    GcStats,
    KernelCompiles,
    add_graph_args,
    cprofile_text,
    export_trace,
    gpu_trace_summary,
    graph_argv,
    graph_config,
    measure_ceilings,
    model_bytes,
    print_gpu_summary,
    prompts_pending,
    step_kinds,
)
from rollout.benchmarks.workloads import WORKLOADS, Workload, decode_roofline_tok_s

if TYPE_CHECKING:
    from transformers import GenerationConfig, PreTrainedModel


def run_ours(model: str, work: Workload, args: argparse.Namespace) -> dict:
    import torch

    from rollout import LLM, SamplingParams, SchedulerConfig

    llm = LLM(
        model,
        load_format="dummy",
        scheduler_config=SchedulerConfig(max_num_batched_tokens=args.max_batched),
        runner_config=graph_config(args),
    )
    warm = work.prompts[:8]
    llm.generate(warm, [SamplingParams(max_tokens=16, ignore_eos=True)] * len(warm), use_tqdm=False)
    # the warm-up's prompts are the workload's first 8: forget their cached blocks, or the timed run
    # skips their prefill (W1: 5,088 of 142,827 prompt tokens)
    llm.engine.blocks.reset_prefix_cache()
    params = [
        SamplingParams(max_tokens=m, temperature=work.temperature, ignore_eos=True, seed=i)
        for i, m in enumerate(work.max_tokens)
    ]
    stats0 = llm.stats()
    # per engine step: end time, whether the batch it collected was decode-only, its tokens
    trace: list[tuple[float, bool, int]] = []
    admission: dict = {}
    adm_prof = None
    if args.profile_admission:  # CPU + GPU over the steps until every prompt is fully computed
        from torch.profiler import ProfilerActivity, profile

        adm_prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
    if args.trace or adm_prof is not None:
        trace = step_kinds(llm)  # steps timed by the batch they collect
    if adm_prof is not None:
        engine = llm.engine
        step = engine.step

        def profiled_step():
            out = step()
            if not admission and not prompts_pending(engine.scheduler):
                torch.cuda.synchronize()
                admission.update(seconds=time.perf_counter() - t, steps=len(trace))
                adm_prof.stop()
            return out

        engine.step = profiled_step
    if args.gc_freeze:
        import gc

        gc.collect()
        gc.freeze()
    prof = None
    if args.profile:
        import cProfile

        prof = cProfile.Profile()
    gpu_prof = None
    if args.gpu_profile:  # kernels only: CPU ops of a whole run would swamp the trace
        from torch.profiler import ProfilerActivity, profile

        gpu_prof = profile(activities=[ProfilerActivity.CUDA])
        gpu_prof.start()
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)  # CPU: tests
    sync()
    if adm_prof is not None:
        adm_prof.start()
    t = time.perf_counter()
    with GcStats() as gc_stats, KernelCompiles() as compiles:
        if prof is not None:
            prof.enable()
        outs = llm.generate(work.prompts, params, use_tqdm=False)
        sync()
        if prof is not None:
            prof.disable()
    seconds = time.perf_counter() - t
    gpu_summary = None
    if gpu_prof is not None:
        gpu_prof.stop()
        gpu_summary = gpu_trace_summary(json.loads(export_trace(gpu_prof)), top=25)
        print(f"GPU busy {gpu_summary['gpu_busy_us'] / 1e6:.3f} s of {seconds:.3f} s (profiled run)")
        print_gpu_summary(gpu_summary, "")
    if adm_prof is not None and not admission:  # prompts waited until the end: the whole run
        adm_prof.stop()
        admission.update(seconds=seconds, steps=len(trace), whole_run=True)
    if adm_prof is not None:
        raw = export_trace(adm_prof)
        Path(args.result).with_suffix(".admission.json.gz").write_bytes(gzip.compress(raw))
        admission.update(gpu_trace_summary(json.loads(raw), top=20))
        print(
            f"admission: {admission['steps']} steps, {admission['seconds'] * 1e3:.1f} ms wall,"
            f" GPU busy {admission['gpu_busy_us'] / 1e3:.1f} ms (profiled)"
        )
        print_gpu_summary(admission, "")
    step_ms_by_batch = {}
    buckets: dict[int, list[float]] = {}
    if trace:
        prev = t
        for end, decode_only, tokens in trace:  # a decode-only batch: one token per row
            key = min(tokens // 32 * 32, 256) if decode_only else -1  # -1: batches with prompt tokens
            buckets.setdefault(key, []).append((end - prev) * 1e3)
            prev = end
        step_ms_by_batch = {k: (len(v), sum(v) / len(v)) for k, v in sorted(buckets.items())}
    if prof is not None:
        Path(args.result).with_suffix(".profile.txt").write_text(cprofile_text(prof, 40))
    stats = llm.stats()
    ntok = sum(len(c.token_ids) for o in outs for c in o.outputs)
    weight_bytes, kv_per_token = model_bytes(llm)
    return dict(
        seconds=seconds,
        out_tokens=ntok,
        out_tok_s=ntok / seconds,
        preemptions=stats.num_preemptions - stats0.num_preemptions,
        num_blocks=stats.num_blocks,
        kv_bytes_per_token=kv_per_token,
        weight_bytes=weight_bytes,
        num_steps=len(trace),
        gc=gc_stats.summary(),  # cyclic GC passes during the timed run: count and ms per generation
        kernel_compiles=compiles.summary(),  # Triton specializations first met during the timed run
        # rows of the batch a step collected // 32 * 32 -> (steps, mean ms); -1: batches with prompts
        step_ms_by_batch=step_ms_by_batch,
        # each step that collected a batch with prompt tokens, in order
        admission_steps_ms=[round(ms, 2) for ms in buckets.get(-1, [])],
        admission=admission,  # --profile-admission: steps until every prompt is computed, GPU summary
        gpu_profile=gpu_summary,  # --gpu-profile: kernel time over the run (the profiler slows the host)
        # then out_tok_s is not a clean measurement
        profiled=bool(args.profile or args.gpu_profile or args.profile_admission),
    )


def run_hf(model: str, work: Workload, args: argparse.Namespace) -> dict:
    """transformers' continuous batching (paged|sdpa). It takes one max_new_tokens for the batch, so
    it only runs workloads with a single output length."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from rollout.presets import resolve_model

    if len(set(work.max_tokens)) != 1:
        return {"skipped": "generate_batch takes one max_new_tokens per batch"}
    path, _ = resolve_model(model)
    cfg = AutoConfig.from_pretrained(path)
    torch.manual_seed(0)
    with torch.device("cuda"):
        m = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    do_sample = work.temperature > 0
    m.generate_batch(
        inputs=work.prompts[:8],
        generation_config=GenerationConfig(
            max_new_tokens=16, do_sample=do_sample, eos_token_id=-1, pad_token_id=0
        ),
    )
    gc = GenerationConfig(
        max_new_tokens=work.max_tokens[0],
        do_sample=do_sample,
        temperature=work.temperature if do_sample else None,
        top_p=None,
        top_k=None,
        eos_token_id=-1,
        pad_token_id=0,
    )
    seconds, outs = hf_generate_timed(m, work.prompts, gc, torch.cuda.synchronize)
    ntok = sum(len(o.generated_tokens) for o in outs.values())
    return dict(seconds=seconds, out_tokens=ntok, out_tok_s=ntok / seconds)


def hf_generate_timed(
    m: PreTrainedModel, prompts: list[list[int]], gc: GenerationConfig, sync: Callable[[], None]
) -> tuple[float, dict]:
    """Seconds from submitting ``prompts`` to the last finished output, and the outputs by request id.

    One batching manager, sized for the workload as ``generate_batch`` sizes it, is built and warmed
    up (its CUDA graphs captured) before the clock starts, as our engine's are: ``generate_batch``
    would build, warm up and destroy it inside the timed call."""
    from transformers.generation.continuous_batching.utils import WorkloadHints

    hints = WorkloadHints(
        max_prompt_length=max(map(len, prompts)),
        max_generated_length=gc.max_new_tokens,
        num_requests=len(prompts),
    )
    cm = m.continuous_batching_context_manager(
        generation_config=gc, workload_hints=hints, warmup=True, block=True, timeout=5
    )
    with cm as manager:
        sync()
        t = time.perf_counter()
        ids = manager.add_requests(inputs=prompts, max_new_tokens=gc.max_new_tokens)
        outs: dict = {}
        while len(outs) < len(ids):
            r = manager.get_result(timeout=1)
            if r is not None and r.error is not None:  # FAILED counts as is_finished(): not a result
                raise RuntimeError(f"HF batching manager failed request {r.request_id}: {r.error}")
            if r is not None and r.is_finished():
                outs[r.request_id] = r
            elif r is None and not manager.is_running():
                left = len(ids) - len(outs)
                raise RuntimeError(f"HF batching manager stopped with {left} requests unfinished")
        sync()
        seconds = time.perf_counter() - t
    return seconds, outs


def child(args: argparse.Namespace) -> None:
    work = WORKLOADS[args.workload]()
    fn = run_ours if args.engine == "ours" else run_hf
    Path(args.result).write_text(json.dumps(fn(args.model, work, args)))


def median_run(runs: list[dict]) -> dict:
    """The run with the median out_tok_s (the lower one of an even count; failed runs are skipped,
    and the first run is returned when all failed), with every run's tok/s under ``repeats_tok_s``."""
    ok = sorted((r for r in runs if "out_tok_s" in r), key=lambda r: r["out_tok_s"])
    res = dict(ok[(len(ok) - 1) // 2] if ok else runs[0])
    if len(runs) > 1:
        res["repeats_tok_s"] = [r.get("out_tok_s") for r in runs]
    return res


def _run_child(args: argparse.Namespace, engine: str, wl: str, result_file: Path) -> dict:
    """One engine on one workload in a fresh subprocess; its result dict (or ``error``)."""
    cmd = [
        sys.executable,
        "-m",
        "rollout.benchmarks.throughput",
        "--child",
        "--engine",
        engine,
        "--workload",
        wl,
        "--model",
        args.model,
        "--result",
        str(result_file),
        "--max-batched",
        str(args.max_batched),
        *graph_argv(args),
        *(["--trace"] if args.trace else []),
        *(["--gc-freeze"] if args.gc_freeze else []),
        *(["--profile"] if args.profile else []),
        *(["--gpu-profile"] if args.gpu_profile else []),
        *(["--profile-admission"] if args.profile_admission else []),
    ]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    res = {"error": proc.stderr[-3000:]} if proc.returncode != 0 else json.loads(result_file.read_text())
    res["wall_s"] = time.perf_counter() - t
    print(proc.stdout, end="")
    res_line = {k: v for k, v in res.items() if k not in ("gpu_profile", "admission")}
    print(engine, wl, json.dumps(res_line)[:600], flush=True)
    return res


def parent(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ceilings = measure_ceilings()
    print(
        f"device {ceilings['device']}: copy {ceilings['copy_bytes_per_s'] / 1e12:.2f} TB/s, "
        f"bf16 matmul {ceilings['matmul_flop_per_s'] / 1e12:.0f} TFLOP/s",
        flush=True,
    )
    results: dict = {"ceilings": ceilings, "model": args.model, "runs": {}}
    engines = ["ours"] + (["hf"] if args.peer == "hf" else [])
    for wl in args.workloads:
        for engine in engines:
            # ours: --repeats fresh processes, the median kept (W1 moves by a few % between runs)
            runs = [_run_child(args, engine, wl, out / f"{engine}_{wl}.json")]
            if engine == "ours":
                runs += [
                    _run_child(args, engine, wl, out / f"{engine}_{wl}.json") for _ in range(args.repeats - 1)
                ]
            results["runs"][f"{engine}/{wl}"] = median_run(runs)
    rows = []
    for wl in args.workloads:
        ours = results["runs"].get(f"ours/{wl}", {})
        hf = results["runs"].get(f"hf/{wl}", {})
        roof = None
        if "weight_bytes" in ours:
            roof = decode_roofline_tok_s(
                WORKLOADS[wl](),
                ours["weight_bytes"],
                ours["kv_bytes_per_token"],
                ceilings["copy_bytes_per_s"],
            )
        rows.append((wl, ours.get("out_tok_s"), hf.get("out_tok_s"), roof))
    results["table"] = rows
    (out / "throughput.json").write_text(json.dumps(results, indent=1))
    print(
        f"\n{'workload':10} {'ours tok/s':>11} {'hf tok/s':>9} {'ours/hf':>8} {'roofline':>9} {'% roof':>7}"
    )
    for wl, o, h, r in rows:
        f = lambda v, fmt: format(v, fmt) if isinstance(v, (int, float)) else "-"  # noqa: E731
        ratio = o / h if o and h else None
        pct = 100 * o / r if o and r else None
        print(f"{wl:10} {f(o, '11.0f')} {f(h, '9.0f')} {f(ratio, '8.1f')} {f(r, '9.0f')} {f(pct, '7.1f')}")
        repeats = results["runs"].get(f"ours/{wl}", {}).get("repeats_tok_s")
        if repeats:
            print(f"{'':10} ours, every run: {', '.join(f(v, '.0f') for v in repeats)} tok/s (median above)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="rollout bench throughput")
    p.add_argument("--model", default="qwen3-0.6b")
    p.add_argument("--workloads", nargs="+", default=["w1"], choices=list(WORKLOADS))
    p.add_argument("--peer", choices=["none", "hf"], default="none")
    p.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    p.add_argument("--timeout", type=int, default=900)
    p.add_argument("--repeats", type=int, default=1, help="runs of ours per workload; the median is kept")
    p.add_argument("--max-batched", type=int, default=8192)
    add_graph_args(p)
    p.add_argument("--trace", action="store_true", help="record per-step times by batch size (ours)")
    p.add_argument("--gc-freeze", action="store_true", help="gc.freeze() before the timed generate (ours)")
    p.add_argument("--profile", action="store_true", help="cProfile the timed generate (ours): *.profile.txt")
    p.add_argument("--gpu-profile", action="store_true", help="profile GPU kernels (ours)")
    p.add_argument(
        "--profile-admission",
        action="store_true",
        help="torch-profile (CPU + GPU) the steps until every prompt is computed (ours)",
    )
    p.add_argument("--child", action="store_true")
    p.add_argument("--engine", choices=["ours", "hf"])
    p.add_argument("--workload")
    p.add_argument("--result")
    args = p.parse_args(argv)
    if args.gpu_profile and args.profile_admission:
        p.error("--gpu-profile and --profile-admission each run the torch profiler; pick one")
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    child(args) if args.child else parent(args)


if __name__ == "__main__":
    main()
