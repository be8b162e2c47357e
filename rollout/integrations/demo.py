"""``rollout demo grpo``: train the built-in tiny model with GRPO on a self-generated digit task.

The engine runs in its own process; after every optimizer step the trainer pushes its weights to it
(a real weight sync over a gloo process group). Prints a progress bar and the mean reward per step;
writes ``<out>/grpo_log.json`` (config, per-step stats, held-out evaluation before and after) and
``<out>/reward_curve.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from typing import Any

from rollout.integrations.grpo import GRPOConfig, StepLog, run_grpo


def build_parser() -> argparse.ArgumentParser:
    d = GRPOConfig()
    p = argparse.ArgumentParser(prog="rollout demo grpo", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=d.model, help="preset or HF model directory (default: tiny)")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--prompts-per-step", type=int, default=d.prompts_per_step)
    p.add_argument("--samples-per-prompt", type=int, default=d.samples_per_prompt, help="GRPO group size n")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--task", choices=["reverse", "copy"], default=d.task)
    p.add_argument("--num-digits", type=int, default=d.num_digits)
    p.add_argument("--digit-credit", type=float, default=d.digit_credit)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device, help="trainer and engine device (default: cpu)")
    p.add_argument("--in-process", action="store_true", help="run the engine in this process (no IPC sync)")
    p.add_argument("--threads", type=int, default=d.threads, help="CPU threads per process (default: 1)")
    p.add_argument("--out", default="grpo_demo", help="output directory (default: ./grpo_demo)")
    return p


def plot_rewards(steps: list[dict[str, Any]], path: str, title: str) -> None:
    """Mean reward and exact-match rate per step, with a moving average, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    x = [s["step"] for s in steps]
    reward = [s["reward_mean"] for s in steps]
    exact = [s["exact_match"] for s in steps]
    k = max(1, len(reward) // 10)
    smooth = [
        sum(reward[max(0, i - k + 1) : i + 1]) / len(reward[max(0, i - k + 1) : i + 1])
        for i in range(len(reward))
    ]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(x, reward, color="tab:blue", alpha=0.35, label="mean reward")
    ax.plot(x, smooth, color="tab:blue", label=f"mean reward ({k}-step average)")
    ax.plot(x, exact, color="tab:green", alpha=0.8, label="exact-match rate")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("reward / rate")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from tqdm.auto import tqdm

    config = GRPOConfig(
        model=args.model,
        steps=args.steps,
        prompts_per_step=args.prompts_per_step,
        samples_per_prompt=args.samples_per_prompt,
        lr=args.lr,
        task=args.task,
        num_digits=args.num_digits,
        digit_credit=args.digit_credit,
        seed=args.seed,
        device=args.device,
        multiprocess=not args.in_process,
        threads=args.threads,
    )
    for flag in ("steps", "prompts_per_step", "samples_per_prompt", "num_digits", "threads"):
        if getattr(args, flag) < 1:  # before seconds of engine start-up, naming the flag
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    bar = tqdm(total=config.steps, desc="grpo", unit="step", dynamic_ncols=True)

    def on_step(log: StepLog) -> None:
        bar.update(1)
        bar.set_postfix(reward=f"{log.reward_mean:.3f}", exact=f"{log.exact_match:.3f}", refresh=False)
        bar.write(
            f"step {log.step + 1:3d}/{config.steps}  mean reward {log.reward_mean:.3f}  "
            f"exact {log.exact_match:.3f}  (gen {log.gen_s:.2f}s, train {log.train_s:.2f}s, "
            f"sync {log.sync_s:.2f}s, |engine-trainer logprob| {log.logprob_mismatch:.1e})"
        )

    where = "in process" if args.in_process else "in its own process"
    tqdm.write(
        f"GRPO on {config.model!r}: {config.task} {config.num_digits} digits, "
        f"{config.prompts_per_step} prompts x {config.samples_per_prompt} samples per step, engine {where}"
    )
    try:
        result = run_grpo(config, on_step=on_step)
    finally:
        bar.close()
    result["runtime_s"] = time.perf_counter() - start
    steps = result["steps"]
    k = max(1, len(steps) // 10)
    first = sum(s["reward_mean"] for s in steps[:k]) / k
    last = sum(s["reward_mean"] for s in steps[-k:]) / k
    result["summary"] = {"reward_first_steps": first, "reward_last_steps": last, "steps_averaged": k}
    log_path = os.path.join(args.out, "grpo_log.json")
    png_path = os.path.join(args.out, "reward_curve.png")
    with open(log_path, "w") as f:
        json.dump(result, f, indent=1)
    plot_rewards(steps, png_path, f"GRPO on {config.model}: {config.task} {config.num_digits} digits")
    b, a = result["before"], result["after"]
    print(f"mean reward, first {k} steps: {first:.3f}  ->  last {k} steps: {last:.3f}")
    print(
        f"held-out (64 prompts): greedy reward {b['greedy_reward']:.3f} -> {a['greedy_reward']:.3f}, "
        f"greedy exact match {b['greedy_exact']:.3f} -> {a['greedy_exact']:.3f}"
    )
    print(f"{config.steps} steps in {result['runtime_s']:.0f} s; wrote {log_path} and {png_path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``rollout demo <name> [options]``."""
    argv = list(argv or [])
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: rollout demo grpo [options]   (rollout demo grpo --help for the options)")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name != "grpo":
        raise ValueError(f"unknown demo {name!r} (demos: grpo)")
    return run(rest)
