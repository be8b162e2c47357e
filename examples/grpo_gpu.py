"""GRPO with an HF model directory on one GPU, trainer and engine colocated; times each RL step.

The engine runs in its own process on the same device; between phases it sleeps so the trainer gets
the memory, and the new weights travel over CUDA IPC (gloo on CPU) after every optimizer step:

    rollout : engine awake -> generate n samples per prompt (processed logprobs = old logprobs)
    train   : engine.sleep(2) (KV cache and weights freed) -> trainer forward/backward/step
    sync    : wake_up(["weights"]) -> update_weights(model) -> wake_up(["kv_cache"])

    python examples/grpo_gpu.py /path/to/Qwen3-0.6B --steps 50 --prompts prompts.jsonl
    python examples/make_random_model.py /tmp/q06 && python examples/grpo_gpu.py /tmp/q06 --steps 6 \
        --summary summary.json                   # timing only: random weights, nothing downloaded

Every step prints (and appends to ``--log``) one JSON line: rollout (``gen_s``), ``sleep_s``, train
(``train_s``), the sync split (``wake_weights_s``, ``update_s``, ``wake_kv_s``), ``sync_s`` = sleep +
wake + update + wake-kv (what colocation and weight sync cost beside rollout and train), ``total_s``,
and ``sync_frac`` = sync_s / total_s. The end prints the means over the steps after the first (the
first includes warm-up), also written to ``--summary`` as JSON.

``--prompts``: a json/jsonl/parquet file with ``prompt`` and ``answer`` columns (reward: the answer
appears in the completion); without it, the digit-reversal task of ``rollout demo grpo`` is used,
rendered with the model's chat template. Needs ``pip install rollout-engine[data]`` for ``--prompts``.
``--device cpu`` runs the same loop on the CPU (smoke test with a tiny model; fp32 engine, gloo sync).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rollout import CacheConfig, RunnerConfig, SamplingParams
from rollout.integrations.data import encode_prompt, load_prompt_dataset, prompt_batches
from rollout.integrations.grpo import DigitTask, group_advantages, policy_loss
from rollout.integrations.rollout_client import RolloutBatch, RolloutClient, sequence_logprobs

TIMES = ("gen_s", "sleep_s", "train_s", "wake_weights_s", "update_s", "wake_kv_s", "sync_s", "total_s")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
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
    p.add_argument("--device", default="cuda", help="trainer and engine device: cuda or cpu")
    p.add_argument("--dtype", default=None, help="engine dtype (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--no-sleep", action="store_true", help="keep the engine awake (no sleep/wake)")
    p.add_argument(
        "--sleep-keeps-graphs",
        action=argparse.BooleanOptionalAction,
        default=RunnerConfig().sleep_keeps_graphs,
        help="RunnerConfig.sleep_keeps_graphs: wake maps memory back under the CUDA graphs (default);"
        " --no-sleep-keeps-graphs: sleep frees them and wake captures them again",
    )
    p.add_argument(
        "--random-rewards",
        action="store_true",
        help="coin-flip rewards (random-weight timing runs: every step then changes the weights)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="CPU threads per process with --device cpu")
    p.add_argument("--log", default="grpo_gpu_log.jsonl", help="per-step JSON lines")
    p.add_argument("--summary", default=None, help="write the run's summary (JSON) here")
    args = p.parse_args(argv)
    if args.steps < 1 or args.n < 1 or args.prompts_per_step < 1 or args.micro_batch < 1:
        p.error("--steps, --n, --prompts-per-step and --micro-batch must be >= 1")
    return args


def prompt_source(args: argparse.Namespace, tokenizer: Any) -> Iterator[tuple[list[list[int]], list[str]]]:
    """Yield (prompt_ids, answers) batches forever."""
    rng = random.Random(args.seed)
    if args.prompts:
        ds = load_prompt_dataset(args.prompts)
        while True:
            for batch in prompt_batches(ds, tokenizer, args.prompts_per_step, seed=rng.randrange(1 << 30)):
                yield batch.prompt_ids, [str(r["answer"]) for r in batch.rows]
    task = DigitTask("reverse", 4)
    while True:
        pairs = [task.sample(rng) for _ in range(args.prompts_per_step)]
        ids = [encode_prompt(tokenizer, f"Reverse the digits, answer only: {p[:-1]}") for p, _ in pairs]
        yield ids, [a for _, a in pairs]


def decode(tokenizer: Any, ids: Sequence[int]) -> str:
    """Completion text; ids beyond the tokenizer (a model vocab padded past it) are dropped."""
    return tokenizer.decode([t for t in ids if t < len(tokenizer)], skip_special_tokens=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.manual_seed(args.seed)
    engine_kwargs: dict[str, Any] = dict(
        device=str(device), dtype=args.dtype or ("bfloat16" if cuda else "float32")
    )
    if cuda:
        engine_kwargs["cache_config"] = CacheConfig(gpu_memory_utilization=args.gpu_memory_utilization)
        engine_kwargs["runner_config"] = RunnerConfig(sleep_keeps_graphs=args.sleep_keeps_graphs)
    else:
        # the two processes share the cores; oversubscribed OpenMP threads slow small CPU kernels a lot
        torch.set_num_threads(args.threads)
        engine_kwargs["env"] = {"OMP_NUM_THREADS": str(args.threads)}
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    # fp32 master weights (bf16 compute under autocast on cuda); the sender casts them to the engine's dtype
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(device)
    model.config.use_cache = False
    checkpointing = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns
        model.activation_checkpointing_enable(checkpointing)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    t1 = time.perf_counter()
    # started after the trainer's weights are on the device: the engine sizes its KV cache from what is free
    client = RolloutClient.local(args.model, multiprocess=True, seed=args.seed, **engine_kwargs)
    setup = {"trainer_load_s": t1 - t0, "engine_start_s": time.perf_counter() - t1}
    print(json.dumps(setup), flush=True)
    params = SamplingParams(temperature=1.0, max_tokens=args.max_tokens, detokenize=False)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    steps: list[dict[str, Any]] = []
    try:
        with open(args.log, "w") as log:
            source = prompt_source(args, tokenizer)
            for step in range(args.steps):
                record = rl_step(args, step, model, tokenizer, optimizer, client, next(source), params, pad)
                steps.append(record)
                print(json.dumps(record), flush=True)
                log.write(json.dumps(record) + "\n")
    finally:
        client.close()
    result = summarize(args, steps, setup)
    print("summary: " + json.dumps(result["mean_after_first"]), flush=True)
    m = result["mean_after_first"]
    print(
        f"per RL step (mean of steps 2..{len(steps)}): total {m['total_s']:.2f} s = rollout {m['gen_s']:.2f}"
        f" + train {m['train_s']:.2f} + sync {m['sync_s']:.2f} (sleep {m['sleep_s']:.2f}, wake weights"
        f" {m['wake_weights_s']:.2f}, update {m['update_s']:.2f}, wake kv {m['wake_kv_s']:.2f});"
        f" sync fraction {m['sync_frac']:.3f} (update alone {m['update_frac']:.3f})",
        flush=True,
    )
    if args.summary:
        with open(args.summary, "w") as f:
            json.dump(result, f, indent=1)
    return 0


def rl_step(
    args: argparse.Namespace,
    step: int,
    model: torch.nn.Module,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer,
    client: RolloutClient,
    prompts: tuple[list[list[int]], list[str]],
    params: SamplingParams,
    pad: int,
) -> dict[str, Any]:
    """One rollout / train / sync step; returns its timings and stats."""
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    sleep = not args.no_sleep

    def now() -> float:
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter()

    # -- rollout: the engine has the device
    t_gen = now()
    prompt_ids, answers = prompts
    batch = client.generate(prompt_ids, n=args.n, params=params)
    texts = [decode(tokenizer, c) for c in batch.completion_ids]
    rewards = torch.tensor([float(answers[g] in t) for g, t in zip(batch.group_ids, texts, strict=True)])
    if args.random_rewards:
        rewards = torch.randint(0, 2, rewards.shape, generator=torch.Generator().manual_seed(step)).float()
    adv = group_advantages(rewards, args.n).to(device)
    # -- train: the engine frees its KV cache and weights (they are sent again below)
    t_sleep = now()
    freed = client.sleep(level=2) if sleep else {}
    t_train = now()
    stats = train(args, model, optimizer, batch, adv, pad)
    if cuda:
        torch.cuda.empty_cache()  # hand the activations' memory back before the engine wakes
    # -- sync: weights first, then the KV cache (graphs kept; --no-sleep-keeps-graphs: captured again)
    t_wake = now()
    if sleep:
        client.wake_up(tags=["weights"])
    t_update = now()
    version = client.update_weights(model)
    t_wake_kv = now()
    if sleep:
        client.wake_up(tags=["kv_cache"])
    t_end = now()
    record: dict[str, Any] = dict(
        step=step,
        reward=float(rewards.mean()),
        version=version,
        batch_weight_version=batch.min_weight_version,
        mean_len=sum(map(len, batch.completion_ids)) / len(batch),
        gen_tokens=sum(map(len, batch.completion_ids)),
        gen_s=t_sleep - t_gen,
        sleep_s=t_train - t_sleep,
        train_s=t_wake - t_train,
        wake_weights_s=t_update - t_wake,
        update_s=t_wake_kv - t_update,
        wake_kv_s=t_end - t_wake_kv,
        **stats,
    )
    record["sync_s"] = record["sleep_s"] + record["wake_weights_s"] + record["update_s"] + record["wake_kv_s"]
    record["total_s"] = t_end - t_gen
    record["sync_frac"] = record["sync_s"] / record["total_s"]
    if cuda:
        record["engine_freed_gib"] = float(freed.get("freed_bytes", 0.0)) / 2**30
        record["trainer_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
    return record


def train(
    args: argparse.Namespace,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: RolloutBatch,
    adv: torch.Tensor,
    pad: int,
) -> dict[str, float]:
    """One optimizer step on the batch: the token-mean clipped surrogate over all of it, accumulated
    over micro-batches. Returns the loss and how far the trainer's logprobs are from the engine's."""
    device = adv.device
    padded = batch.padded(pad, device=device)
    model.train()
    optimizer.zero_grad(set_to_none=True)
    total_tokens = padded.loss_mask.sum().clamp(min=1.0)
    loss_sum = torch.zeros((), device=device)
    diff_sum = torch.zeros((), device=device)
    clip_sum = torch.zeros((), device=device)
    for i in range(0, len(batch), args.micro_batch):
        sl = slice(i, i + args.micro_batch)
        width = int(padded.attention_mask[sl].sum(dim=1).max())  # rows are right-padded: trim columns
        ids, attn = padded.input_ids[sl, :width], padded.attention_mask[sl, :width]
        mask, old = padded.loss_mask[sl, :width], padded.logprobs[sl, :width]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logp = sequence_logprobs(model, ids, attn)
        loss, stats = policy_loss(logp, old, adv[sl], mask)
        # policy_loss averages over its micro-batch; re-weight to a mean over the whole batch
        weighted = loss * mask.sum() / total_tokens
        weighted.backward()
        loss_sum += weighted.detach()
        diff_sum += ((logp.detach() - old).abs() * mask).sum()
        clip_sum += stats["clip_frac"] * mask.sum()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {
        "loss": float(loss_sum),
        "grad_norm": float(grad_norm),
        "clip_frac": float(clip_sum / total_tokens),
        # mean |trainer - engine| logprob of the sampled tokens, before this step's update
        "logprob_mismatch": float(diff_sum / total_tokens),
    }


def summarize(
    args: argparse.Namespace, steps: list[dict[str, Any]], setup: dict[str, float]
) -> dict[str, Any]:
    """Means over the steps after the first (all steps when there is only one)."""
    tail = steps[1:] or steps
    mean = {k: sum(s[k] for s in tail) / len(tail) for k in (*TIMES, "mean_len", "gen_tokens")}
    mean["sync_frac"] = mean["sync_s"] / mean["total_s"]
    mean["update_frac"] = mean["update_s"] / mean["total_s"]
    mean["gen_frac"] = mean["gen_s"] / mean["total_s"]
    mean["train_frac"] = mean["train_s"] / mean["total_s"]
    mean["gen_tokens_per_s"] = mean["gen_tokens"] / mean["gen_s"]
    device: dict[str, Any] = {"device": args.device}
    if torch.cuda.is_available() and args.device.startswith("cuda"):
        device["name"] = torch.cuda.get_device_name()
    return {
        "config": dict(vars(args)),
        "device": device,
        "setup": setup,
        "steps_averaged": len(tail),
        "mean_after_first": mean,
        "first_step": {k: steps[0][k] for k in TIMES},
        "steps": steps,
    }


if __name__ == "__main__":
    raise SystemExit(main())
