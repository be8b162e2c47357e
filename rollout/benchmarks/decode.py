"""W3: decode step time for batch x context, CUDA graphs on and off, against the bandwidth floor.

    rollout bench decode --model qwen3-0.6b --out $OUT

A step here is a whole engine step (schedule, inputs, forward, logits, sampling, host copy), timed
with the host clock over many steps. Without the overlapped loop each step ends on the host copy
of its sampled tokens (the GPU idles while the host works); with it (the CUDA default) the host
prepares step N+1 while N runs. ``--variants`` switches fused kernels / overlap on one engine.
Floor = (weight bytes + batch * context * KV bytes/token) /
measured copy bandwidth.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

import torch

from rollout import LLM, SamplingParams
from rollout.benchmarks.common import measure_ceilings, model_bytes, prompts_pending


def time_decode(
    llm: LLM, batch: int, context: int, steps: int, rng: random.Random
) -> tuple[float, float] | None:
    """(mean ms, mean KV tokens per sequence) of ``steps`` decode steps with exactly ``batch`` sequences
    of ``context`` prompt tokens; None if they do not fit in the KV cache. Requests admitted early
    start decoding while later ones prefill, so max_tokens leaves room for the whole prefill phase:
    nobody finishes while timed, and each sequence holds more than ``context`` tokens by then."""
    engine = llm.engine
    bs = engine.cache_config.block_size
    prefill_steps = -(-batch * context // engine.scheduler_config.max_num_batched_tokens) + 2
    max_tokens = prefill_steps + steps + 4
    if batch * -(-(context + max_tokens) // bs) > engine.runner.num_blocks:
        return None
    ids = [f"d{batch}-{context}-{i}" for i in range(batch)]
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=1.0, seed=0)
    for rid in ids:
        engine.add_request(rid, [rng.randrange(100, 10000) for _ in range(context)], params)
    while prompts_pending(engine.scheduler):
        engine.step()
    engine.step()  # first pure decode step (warm)
    kv_before = sum(r.num_computed_tokens for r in engine.scheduler.running)
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    ms = (time.perf_counter() - start) / steps * 1e3
    kv_after = sum(r.num_computed_tokens for r in engine.scheduler.running)
    assert len(engine.scheduler.running) == batch, "a sequence finished while timed"
    engine.abort(ids)
    # each timed step reads every sequence's KV, one token longer per step: the mean over the steps
    return ms, (kv_before + kv_after) / 2 / batch


VARIANTS = {  # name -> (fused ops, overlapped loop)
    "base": (False, False),
    "fused": (True, False),
    "overlap": (False, True),
    "fused+overlap": (True, True),
}


def set_variant(llm: LLM, fused: bool, overlap: bool) -> None:
    """Switch the fused kernels and the overlapped loop of a live engine (recaptures the graphs)."""
    runner = llm.engine.runner
    modules = [m for m in runner.model.modules() if hasattr(m, "fused")]
    if any(m.fused != fused for m in modules):
        for m in modules:
            m.fused = fused
        if runner.graphs is not None:
            runner.graphs = None
            torch.cuda.empty_cache()
            runner.capture_graphs()
    llm.engine.overlap = overlap


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="rollout bench decode")
    p.add_argument("--model", default="qwen3-0.6b")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 128, 256])
    p.add_argument("--contexts", type=int, nargs="+", default=[128, 1024, 4096])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--variants", nargs="+", default=["fused+overlap"], choices=list(VARIANTS))
    p.add_argument("--no-eager", action="store_true", help="skip the rows without CUDA graphs")
    p.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    args = p.parse_args(argv)
    ceil = measure_ceilings()
    llm = LLM(args.model, load_format="dummy")
    weights, kvb = model_bytes(llm)
    rng = random.Random(0)
    rows = []
    for variant in args.variants:
        set_variant(llm, *VARIANTS[variant])
        graphs = llm.engine.runner.graphs
        modes = [True, False] if graphs is not None and not args.no_eager else [graphs is not None]
        for use_graphs in modes:
            llm.engine.runner.graphs = graphs if use_graphs else None
            for context in args.contexts:
                for batch in args.batches:
                    timed = time_decode(llm, batch, context, args.steps, rng)
                    ms, kv_tokens = timed if timed is not None else (None, context)
                    floor_ms = (weights + batch * kv_tokens * kvb) / ceil["copy_bytes_per_s"] * 1e3
                    rows.append(
                        dict(
                            variant=variant,
                            graphs=use_graphs,
                            batch=batch,
                            context=context,
                            step_ms=ms,
                            kv_tokens_per_seq=kv_tokens,  # KV read per sequence over the timed steps
                            floor_ms=floor_ms,
                        )
                    )
                    print(json.dumps(rows[-1]), flush=True)
        llm.engine.runner.graphs = graphs
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "decode.json").write_text(json.dumps(dict(ceilings=ceil, rows=rows), indent=1))
    print(
        f"\n{'variant':14} {'graphs':6} {'batch':>5} {'ctx':>5} {'step ms':>8} {'floor ms':>8}"
        f" {'GB/s':>6} {'% copy':>6}"
    )
    for r in rows:
        head = f"{r['variant']:14} {r['graphs']!s:6} {r['batch']:5} {r['context']:5}"
        if r["step_ms"] is None:
            print(f"{head}  does not fit in the KV cache")
            continue
        gbs = (weights + r["batch"] * r["kv_tokens_per_seq"] * kvb) / (r["step_ms"] / 1e3) / 1e9
        pct = 100 * r["floor_ms"] / r["step_ms"]
        print(f"{head} {r['step_ms']:8.2f} {r['floor_ms']:8.2f} {gbs:6.0f} {pct:6.1f}")


if __name__ == "__main__":
    main()
