"""Issue 3: per-step cost of the engine core process split. The same decode workload runs on the
in-process engine and over ZMQ (``LLM(multiprocess=True)``); per-step time is the difference of two
generate calls that differ only in max_tokens, divided by the extra steps (prefill and admission
cancel out; fresh prompts each call, so the prefix cache serves nothing): the median of three such
pairs, after one pair of warm-up.

    python -m rollout.benchmarks.core_overhead --out $OUT
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


def per_step_ms(llm: LLM, batch: int, context: int, short: int, long: int, rng: random.Random) -> float:
    times = []
    for max_tokens in (short, long):
        prompts = [[rng.randrange(100, 10000) for _ in range(context)] for _ in range(batch)]
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=1.0, seed=0)
        torch.cuda.synchronize()
        t = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        times.append(time.perf_counter() - t)
    return (times[1] - times[0]) / (long - short) * 1e3


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="rollout bench core_overhead")
    p.add_argument("--model", default="qwen3-0.6b")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 256])
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--short", type=int, default=16)
    p.add_argument("--long", type=int, default=80)
    p.add_argument("--modes", nargs="+", default=["inproc", "zmq"])
    p.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    args = p.parse_args(argv)
    rows = []
    for mode in args.modes:
        llm = LLM(args.model, load_format="dummy", multiprocess=mode == "zmq")
        rng = random.Random(0)
        llm.generate([[1, 2, 3]] * 4, SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)  # warm
        for batch in args.batches:
            per_step_ms(llm, batch, args.context, args.short, args.long, rng)  # warm: kernels, graphs
            runs = sorted(per_step_ms(llm, batch, args.context, args.short, args.long, rng) for _ in range(3))
            rows.append(dict(mode=mode, batch=batch, context=args.context, step_ms=runs[1], runs_ms=runs))
            print(json.dumps(rows[-1]), flush=True)
        llm.shutdown()
        del llm
        torch.cuda.empty_cache()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "core_overhead.json").write_text(json.dumps(rows, indent=1))
    print(f"\n{'mode':7} {'batch':>5} {'ctx':>5} {'step ms':>8}")
    for r in rows:
        print(f"{r['mode']:7} {r['batch']:5} {r['context']:5} {r['step_ms']:8.2f}")


if __name__ == "__main__":
    main()
