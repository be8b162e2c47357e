"""The ``rollout`` command."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

WORKLOADS = (
    "throughput", "rl", "decode", "prefill", "weight_sync", "serve", "core_overhead", "host_overhead",
    "step_profile", "host_ops",
)  # fmt: skip


def _generate(args: argparse.Namespace) -> int:
    from rollout import LLM, SamplingParams

    prompts: list = [_prompt_ids(p) for p in args.prompt_ids] if args.prompt_ids else list(args.prompt)
    llm = LLM(args.model, device=args.device, dtype=args.dtype, load_format=args.load_format, seed=args.seed)
    params = SamplingParams(
        n=args.n,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_tokens=args.max_tokens,
        seed=args.seed,
        ignore_eos=args.ignore_eos,
    )
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=not args.json)
    elapsed = time.perf_counter() - start
    records = []
    for out in outs:
        for c in out.outputs:
            records.append(
                dict(
                    prompt=out.prompt,
                    prompt_token_ids=out.prompt_token_ids,
                    sample=c.index,
                    text=c.text,
                    token_ids=c.token_ids,
                    logprobs=[round(x, 4) for x in c.logprobs],
                    finish_reason=c.finish_reason,
                )
            )
    if args.json:
        print(json.dumps(records))
        return 0
    for r in records:
        shown = r["text"] if r["text"] is not None else r["token_ids"]
        print(
            f"[{r['sample']}] {r['prompt']!r} -> {shown!r} "
            f"({len(r['token_ids'])} tokens, {r['finish_reason']})"
        )
    total = sum(len(r["token_ids"]) for r in records)
    print(f"{total} tokens in {elapsed:.2f} s ({total / elapsed:.1f} tok/s)")
    return 0


def _prompt_ids(text: str) -> list:
    """One ``--prompt-ids`` value: a JSON list (its ids are checked by the engine)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--prompt-ids {text!r} is not JSON: {e}") from None
    if not isinstance(value, list):  # a bare 5 became the prompt [5], two such flags one prompt
        raise ValueError(f"--prompt-ids {text!r} must be a JSON list of token ids")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rollout", description="rollout-engine: an LLM rollout engine for RL"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate from prompts (text or token ids)")
    g.add_argument(
        "model", nargs="?", default="tiny", help="local HF model directory or preset (default: tiny)"
    )
    given = g.add_mutually_exclusive_group()
    given.add_argument("--prompt", action="append", default=None, help="a text prompt (repeatable)")
    given.add_argument(
        "--prompt-ids", action="append", default=None, help="a JSON list of token ids (repeatable)"
    )
    g.add_argument("--n", type=int, default=1)
    g.add_argument("--max-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=-1)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    g.add_argument("--dtype", default="auto")
    g.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "dummy"])
    g.add_argument("--json", action="store_true", help="print one JSON list of samples, no progress bar")
    g.set_defaults(func=_generate)
    b = sub.add_parser(
        "bench",
        help="GPU benchmarks of BENCHMARKS.md: throughput (W1), rl (W2), decode (W3), prefill (W4)",
        add_help=False,
    )
    b.add_argument("workload", nargs="?", choices=WORKLOADS)
    b.add_argument("rest", nargs=argparse.REMAINDER, help="options of the workload (--help for them)")
    b.set_defaults(func=_bench)
    d = sub.add_parser("demo", help="demos: grpo (train the tiny model with GRPO on CPU)", add_help=False)
    d.add_argument("rest", nargs=argparse.REMAINDER, help="the demo name and its options")
    d.set_defaults(func=_demo)
    from rollout.server.launch import add_serve_parser  # argparse only: fastapi loads on `serve`

    add_serve_parser(sub)
    return parser


def _demo(args: argparse.Namespace) -> int:
    from rollout.integrations.demo import main as demo_main

    return demo_main(args.rest)


def _bench(args: argparse.Namespace) -> int:
    import importlib

    if args.workload is None:  # `rollout bench` or `rollout bench --help`
        wanted = any(a in ("-h", "--help") for a in args.rest)
        usage = "usage: rollout bench WORKLOAD [options]  (rollout bench WORKLOAD --help for them)"
        print(f"{usage}\nworkloads: {', '.join(WORKLOADS)}", file=sys.stdout if wanted else sys.stderr)
        return 0 if wanted else 2
    module = importlib.import_module(f"rollout.benchmarks.{args.workload}")
    module.main(args.rest)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # bench and demo pass their options on; a leading option (`rollout demo --help`) is not part of
    # argparse's remainder, so it comes back unknown and is passed on too.
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.command not in ("bench", "demo"):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command in ("bench", "demo"):
        args.rest = [*unknown, *args.rest]
    if args.command == "generate" and not args.prompt and not args.prompt_ids:
        args.prompt = ["Hello, world"]
    try:
        return args.func(args)
    except ValueError as e:
        print(f"rollout: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
