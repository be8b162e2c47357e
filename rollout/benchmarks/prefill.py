"""W4: prefill throughput (64 prompts x 2048 tokens, one output token) against the matmul ceiling.

rollout bench prefill --model qwen3-0.6b --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

import torch

from rollout import LLM, SamplingParams, SchedulerConfig
from rollout.benchmarks.common import add_graph_args, graph_config, measure_ceilings


def prefill_flops(llm: LLM, num_prompts: int, length: int) -> float:
    """Matmul FLOPs of the prefill: 2 x (non-embedding params) per token, causal attention
    (2 x 2 x heads x head_dim x length^2 / 2 per layer and prompt), and one LM-head row per prompt."""
    mc = llm.engine.model_config
    model = llm.engine.runner.model
    embed = mc.vocab_size * mc.hidden_size
    params = sum(p.numel() for p in model.parameters())
    tied = getattr(mc.hf_config, "tie_word_embeddings", False)
    body = params - embed * (1 if tied else 2)
    attention = 2 * mc.num_layers * mc.num_heads * mc.head_dim * length * length  # QK^T + PV, causal half
    return num_prompts * (2 * body * length + attention + 2 * embed)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="rollout bench prefill")
    p.add_argument("--model", default="qwen3-0.6b")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--max-batched", type=int, default=16384)
    p.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    add_graph_args(p)
    args = p.parse_args(argv)

    ceil = measure_ceilings()
    llm = LLM(
        args.model,
        load_format="dummy",
        scheduler_config=SchedulerConfig(max_num_batched_tokens=args.max_batched),
        runner_config=graph_config(args),
    )
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 10000) for _ in range(args.length)] for _ in range(args.num_prompts)]
    params = SamplingParams(max_tokens=1, ignore_eos=True)
    llm.generate(
        [[rng.randrange(100, 10000) for _ in range(args.length)] for _ in range(4)], params, use_tqdm=False
    )
    torch.cuda.synchronize()
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    flops = prefill_flops(llm, args.num_prompts, args.length)
    res = dict(
        seconds=seconds,
        prompt_tok_s=args.num_prompts * args.length / seconds,
        tflop_s=flops / seconds / 1e12,
        pct_matmul_ceiling=100 * flops / seconds / ceil["matmul_flop_per_s"],
        ceilings=ceil,
    )
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "prefill.json").write_text(json.dumps(res, indent=1))
    print(
        f"prefill {args.num_prompts}x{args.length}: {seconds:.3f} s, {res['prompt_tok_s']:.0f} tok/s, "
        f"{res['tflop_s']:.0f} TFLOP/s = {res['pct_matmul_ceiling']:.1f}% of the matmul ceiling"
    )


if __name__ == "__main__":
    main()
