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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="rollout bench rl")
    p.add_argument("--model", default="qwen3-0.6b")
    p.add_argument("--num-prompts", type=int, default=128)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    args = p.parse_args(argv)
    rng = random.Random(0)
    prompts = [
        [rng.randrange(100, 10000) for _ in range(rng.randint(256, 512))] for _ in range(args.num_prompts)
    ]
    lengths = [min(4096, 64 + int(rng.expovariate(1 / 700))) for _ in prompts]
    llm = LLM(args.model, load_format="dummy")
    llm.generate(prompts[:4], SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)
    before = llm.stats()
    params = [
        SamplingParams(n=args.n, temperature=1.0, max_tokens=m, ignore_eos=True, seed=i)
        for i, m in enumerate(lengths)
    ]
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
    )
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "rl.json").write_text(json.dumps(res, indent=1))
    print("W2 " + json.dumps(res))


if __name__ == "__main__":
    main()
