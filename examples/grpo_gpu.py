"""GRPO with an HF model directory on one GPU, trainer and engine colocated (not run in CI).

The engine runs in its own process on the same GPU; between phases it sleeps so the trainer gets the
memory, and the new weights travel over CUDA IPC after every optimizer step:

    rollout phase : engine awake -> generate n samples per prompt (processed logprobs = old logprobs)
    train phase   : engine.sleep(2) (KV cache and weights freed) -> trainer forward/backward/step
    sync          : wake_up(["weights"]) -> update_weights(model) -> wake_up(["kv_cache"])

    python examples/grpo_gpu.py /path/to/Qwen3-0.6B --steps 50 --prompts prompts.jsonl

``--prompts``: a json/jsonl/parquet file with ``prompt`` and ``answer`` columns (reward: the answer
appears in the completion); without it, the digit-reversal task of ``rollout demo grpo`` is used,
rendered with the model's chat template. Needs ``pip install rollout-engine[data]`` for ``--prompts``.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rollout import CacheConfig, SamplingParams
from rollout.integrations.data import encode_prompt, load_prompt_dataset, prompt_batches
from rollout.integrations.grpo import DigitTask, group_advantages, policy_loss
from rollout.integrations.rollout_client import RolloutClient, sequence_logprobs


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="local HF model directory")
    p.add_argument("--prompts", default=None, help="json/jsonl/parquet with prompt and answer columns")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--prompts-per-step", type=int, default=32)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--micro-batch", type=int, default=16, help="sequences per forward/backward")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.35, help="engine share while awake")
    p.add_argument("--log", default="grpo_gpu_log.jsonl")
    return p.parse_args()


def prompt_source(args: argparse.Namespace, tokenizer):
    """Yield (prompt_ids, answers) batches forever."""
    if args.prompts:
        ds = load_prompt_dataset(args.prompts)
        while True:
            for batch in prompt_batches(ds, tokenizer, args.prompts_per_step, seed=random.randrange(1 << 30)):
                yield batch.prompt_ids, [str(r["answer"]) for r in batch.rows]
    task, rng = DigitTask("reverse", 4), random.Random(0)
    while True:
        pairs = [task.sample(rng) for _ in range(args.prompts_per_step)]
        ids = [encode_prompt(tokenizer, f"Reverse the digits, answer only: {p[:-1]}") for p, _ in pairs]
        yield ids, [a for _, a in pairs]


def main() -> None:
    args = parse_args()
    device = torch.device("cuda")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    # fp32 master weights (bf16 compute under autocast); the sender casts them to the engine's bf16
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(device)
    model.gradient_checkpointing_enable()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    client = RolloutClient.local(
        args.model,
        multiprocess=True,
        device="cuda",
        dtype="bfloat16",
        cache_config=CacheConfig(gpu_memory_utilization=args.gpu_memory_utilization),
    )
    params = SamplingParams(temperature=1.0, max_tokens=args.max_tokens, detokenize=False)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    source = prompt_source(args, tokenizer)
    with open(args.log, "w") as log:
        run(args, model, tokenizer, optimizer, client, source, params, pad, device, log)


def run(args, model, tokenizer, optimizer, client, source, params, pad, device, log) -> None:
    try:
        for step in range(args.steps):
            # -- rollout phase: the engine has the GPU
            t0 = time.perf_counter()
            prompt_ids, answers = next(source)
            batch = client.generate(prompt_ids, n=args.n, params=params)
            texts = [tokenizer.decode(c, skip_special_tokens=True) for c in batch.completion_ids]
            rewards = torch.tensor(
                [float(answers[g] in t) for g, t in zip(batch.group_ids, texts, strict=True)]
            )
            adv = group_advantages(rewards, args.n).to(device)
            # -- train phase: the engine frees its KV cache and weights (they are sent again below)
            t1 = time.perf_counter()
            client.sleep(level=2)
            padded = batch.padded(pad, device=device)
            model.train()
            optimizer.zero_grad(set_to_none=True)
            total_tokens = padded.loss_mask.sum()
            for i in range(0, len(batch), args.micro_batch):
                sl = slice(i, i + args.micro_batch)
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    logp = sequence_logprobs(model, padded.input_ids[sl], padded.attention_mask[sl])
                mask = padded.loss_mask[sl]
                loss, _ = policy_loss(logp, padded.logprobs[sl], adv[sl], mask)
                # policy_loss averages over its micro-batch; re-weight to a mean over the whole batch
                (loss * mask.sum() / total_tokens).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()  # hand the activations' memory back before the engine wakes
            # -- sync: weights first (into freshly allocated storage), then the KV cache
            t2 = time.perf_counter()
            client.wake_up(tags=["weights"])
            version = client.update_weights(model)
            client.wake_up(tags=["kv_cache"])
            t3 = time.perf_counter()
            record = dict(
                step=step,
                reward=float(rewards.mean()),
                version=version,
                gen_s=t1 - t0,
                train_s=t2 - t1,
                sync_s=t3 - t2,
                mean_len=sum(map(len, batch.completion_ids)) / len(batch),
            )
            print(json.dumps(record), flush=True)
            log.write(json.dumps(record) + "\n")
    finally:
        client.close()


if __name__ == "__main__":
    main()
