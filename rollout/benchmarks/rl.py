"""W2: an RL rollout of GRPO shape: 128 prompts of 256-512 tokens x n=8 samples, long-tailed output
lengths up to 4K, temperature 1, sampled-token logprobs. Reports makespan, output tok/s and the
prefix cache's effect (prompt tokens computed / submitted, ~1/8 expected).

    rollout bench rl --model qwen3-0.6b --out $OUT

EOS is ignored (random weights), so a group's samples share one length drawn per prompt from a
long-tailed distribution: 64 + Exp(mean 700) tokens, capped at 4096.
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
from rollout.benchmarks.common import add_graph_args, graph_config, step_kinds

# Decode-only steps by batch (the tail of a long-tailed rollout runs small batches): label, lowest
_BATCH_BUCKETS = (("129+", 129), ("33-128", 33), ("9-32", 9), ("1-8", 1))


def summarize_steps(steps: list[tuple[float, bool, int]], start: float) -> dict:
    """Steps, seconds and mean ms of the decode-only and the mixed steps, and of the decode-only
    steps by batch size ("decode_batch_1-8", ..., those that occurred). A step's time: from the
    previous step's end (see ``step_kinds``: the step that collected the batch)."""
    kinds = ["decode_only", "mixed"] + [f"decode_batch_{label}" for label, _ in reversed(_BATCH_BUCKETS)]
    out = {kind: {"steps": 0, "seconds": 0.0, "tokens": 0} for kind in kinds}
    prev = start
    for end, decode_only, tokens in steps:
        rows = [out["decode_only" if decode_only else "mixed"]]
        if decode_only and tokens:  # one token per sequence (0: a step that collected nothing)
            label = next(label for label, lowest in _BATCH_BUCKETS if tokens >= lowest)
            rows.append(out[f"decode_batch_{label}"])
        for row in rows:
            row["steps"] += 1
            row["seconds"] += end - prev
            row["tokens"] += tokens
        prev = end
    for row in out.values():
        row["mean_ms"] = 1e3 * row["seconds"] / row["steps"] if row["steps"] else 0.0
    return {kind: row for kind, row in out.items() if row["steps"] or not kind.startswith("decode_batch")}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="rollout bench rl")
    p.add_argument("--model", default="qwen3-0.6b")
    p.add_argument("--num-prompts", type=int, default=128)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    add_graph_args(p)
    args = p.parse_args(argv)
    rng = random.Random(0)
    prompts = [
        [rng.randrange(100, 10000) for _ in range(rng.randint(256, 512))] for _ in range(args.num_prompts)
    ]
    lengths = [min(4096, 64 + int(rng.expovariate(1 / 700))) for _ in prompts]
    llm = LLM(args.model, load_format="dummy", runner_config=graph_config(args))
    llm.generate(prompts[:4], SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)
    # forget the warm-up's blocks: 4 of the prompts would otherwise be computed before the timed run
    # (prompt tokens computed 56,720 instead of 58,208 of 402,720)
    llm.engine.blocks.reset_prefix_cache()
    before = llm.stats()
    params = [
        SamplingParams(n=args.n, temperature=1.0, max_tokens=m, ignore_eos=True, seed=i)
        for i, m in enumerate(lengths)
    ]
    steps = step_kinds(llm)
    torch.cuda.synchronize()
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    makespan = time.perf_counter() - start
    after = llm.stats()
    out_tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    submitted = after.num_prompt_tokens - before.num_prompt_tokens
    computed = after.num_prompt_tokens_computed - before.num_prompt_tokens_computed
    res = dict(
        makespan_s=makespan,
        out_tokens=out_tokens,
        out_tok_s=out_tokens / makespan,
        prompt_tokens_submitted=submitted,
        prompt_tokens_computed=computed,
        computed_fraction=computed / submitted,
        preemptions=after.num_preemptions - before.num_preemptions,
        piecewise_tokens=args.piecewise_tokens,
        mixed_graph_tokens=args.mixed_graph_tokens,
        steps=summarize_steps(steps, start),  # decode-only (graphs) vs mixed (eager) steps
    )
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "rl.json").write_text(json.dumps(res, indent=1))
    print("W2 " + json.dumps(res))


if __name__ == "__main__":
    main()
