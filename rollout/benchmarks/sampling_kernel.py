"""Torch sampler vs the fused sampling kernel at V=151,936 (Qwen vocab), bf16 logits, on one GPU.

    python -m rollout.benchmarks.sampling_kernel --out $OUT [--sweep]

For B in {1, 32, 256}, greedy / temperature 1 (raw logprobs) / temperature 1 with processed
logprobs and two banned tokens per row, and logprobs in {0, 5}: the median time of
``sample(..., use_kernel=False)`` and ``sample(..., use_kernel=True)`` (triton.testing.do_bench),
after checking that both give the same tokens. ``--sweep`` also times the kernel alone over launch
configurations (vocab chunks per row, tile width, warps). Writes ``sampling_kernel.json`` under
``--out`` and prints a table. Also reports the time of a device copy of the logits (read + write),
a memory floor for one pass.
"""

from __future__ import annotations

import argparse
import json
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

from rollout.kernels import sampling as ks
from rollout.samplers import RowSampling, SamplingParams, SamplingTensors, rng, sample

DEVICE = "cuda"
VOCAB = 151_936
BATCHES = (1, 32, 256)
MODES = ("greedy", "t1", "t1-processed")
SWEEP_CHUNKS = (1, 2, 4, 8, 16, 32, 64, 128)
SWEEP_TILES = ((1024, 4), (2048, 4), (2048, 8), (4096, 8))


def make_case(batch: int, mode: str, logprobs: int) -> tuple[torch.Tensor, SamplingTensors]:
    """Random bf16 logits (scale 4) and the batch's sampling tensors, on CUDA."""
    params = SamplingParams(
        temperature=0.0 if mode == "greedy" else 1.0,
        logprobs=logprobs or None,
        logprobs_mode="processed" if mode == "t1-processed" else "raw",
    )
    banned = (VOCAB - 293, VOCAB - 291) if mode == "t1-processed" else ()  # Qwen's <|endoftext|>, <|im_end|>
    rows = [
        RowSampling(params, seed=2**63 + 977 * i, offset=i, banned_token_ids=banned) for i in range(batch)
    ]
    gen = torch.Generator(DEVICE).manual_seed(batch)
    logits = torch.randn(batch, VOCAB, device=DEVICE, generator=gen) * 4
    return logits.to(torch.bfloat16), SamplingTensors.build(rows, VOCAB, DEVICE)


def noise_mismatches(batch: int) -> dict:
    """How many of the kernel's random bits / log E values differ from rng's (both should be 0)."""
    seeds = torch.randint(-(2**63), 2**63 - 1, (batch,), device=DEVICE)
    offsets = torch.randint(0, 2**40, (batch,), device=DEVICE)
    bits, log_e = ks.race_noise(seeds, offsets, VOCAB)
    ref = rng.log_exponential(seeds, offsets, VOCAB)
    return {
        "bits": int((bits != rng.random_bits(seeds, offsets, VOCAB)).sum()),
        "log_e": int((log_e != ref).sum()),
        "log_e_max_abs_diff": float((log_e - ref).abs().max()),
    }


def median_ms(fn: Callable[[], object]) -> float:
    return float(do_bench(fn, warmup=10, rep=40, return_mode="median"))


def _above_kth(ids: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return torch.where(values > values[:, -1:], ids, -1).sort(-1).values


@contextmanager
def launch_config(config: dict | None) -> Iterator[None]:
    """Make ``sample``'s kernel path launch with ``config`` (a sweep record) instead of the heuristics.

    Tuning only: it swaps the module's defaults for the duration of the block.
    """
    if config is None:
        yield
        return
    saved = ks._DEFAULT_BLOCK, ks._DEFAULT_WARPS, ks._default_num_chunks
    ks._DEFAULT_BLOCK, ks._DEFAULT_WARPS = config["block"], config["warps"]
    ks._default_num_chunks = lambda batch, tiles, device: min(config["chunks"], tiles)
    try:
        yield
    finally:
        ks._DEFAULT_BLOCK, ks._DEFAULT_WARPS, ks._default_num_chunks = saved


def bench_paths(batch: int, mode: str, logprobs: int, tuned: dict | None) -> dict:
    """torch path vs kernel path (default launch, and ``tuned`` from the sweep when given)."""
    logits, t = make_case(batch, mode, logprobs)
    ref = sample(logits, t, use_kernel=False)
    out = sample(logits, t, use_kernel=True)
    same = torch.equal(ref.token_ids, out.token_ids)
    if ref.topk_logprobs is not None:
        same = same and torch.equal(ref.ranks, out.ranks)
        # topk orders ties arbitrarily (bf16 logits tie often): compare the ids above each row's K-th value.
        same = same and torch.equal(
            _above_kth(ref.topk_ids, ref.topk_logprobs), _above_kth(out.topk_ids, out.topk_logprobs)
        )
    err = (ref.logprobs - out.logprobs).abs().max().item()
    record = dict(batch=batch, mode=mode, logprobs=logprobs, same_tokens=same, max_logprob_err=err)
    record["torch_ms"] = median_ms(lambda: sample(logits, t, use_kernel=False))
    record["kernel_ms"] = median_ms(lambda: sample(logits, t, use_kernel=True))
    with launch_config(tuned):
        record["same_tokens"] &= torch.equal(ref.token_ids, sample(logits, t, use_kernel=True).token_ids)
        record["tuned_ms"] = median_ms(lambda: sample(logits, t, use_kernel=True))
    record["tuned"] = tuned and {k: tuned[k] for k in ("block", "warps", "chunks")}
    record["copy_ms"] = median_ms(lambda: logits.clone())
    return record


def sweep(batch: int, mode: str) -> list[dict]:
    """Time the kernel alone over launch configurations; check each one's tokens."""
    logits, t = make_case(batch, mode, 0)
    ref = sample(logits, t, use_kernel=False).token_ids
    records = []
    for block, warps in SWEEP_TILES:
        tiles = triton.cdiv(VOCAB, block)
        for chunks in [c for c in SWEEP_CHUNKS if c <= tiles]:

            def run(block: int = block, warps: int = warps, chunks: int = chunks) -> ks.FusedSampleOutput:
                return ks.fused_sample(
                    logits, t.temperature, t.greedy, t.seeds, t.offsets, t.processed_mode,
                    t.banned_rows, t.banned_tokens, all_greedy=t.all_greedy, any_processed=t.any_processed,
                    num_chunks=chunks, block_size=block, num_warps=warps,
                )  # fmt: skip

            same = torch.equal(run().token_ids, ref)
            records.append(
                dict(
                    batch=batch,
                    mode=mode,
                    block=block,
                    warps=warps,
                    chunks=chunks,
                    ms=median_ms(run),
                    same_tokens=same,
                )
            )
    return records


def _sweep_line(batch: int, mode: str, records: list[dict]) -> str:
    best = min(records, key=lambda r: r["ms"])
    chunks = ks._default_num_chunks(batch, triton.cdiv(VOCAB, ks._DEFAULT_BLOCK), torch.device(DEVICE))
    default = (ks._DEFAULT_BLOCK, ks._DEFAULT_WARPS, chunks)
    at_default = [r["ms"] for r in records if (r["block"], r["warps"], r["chunks"]) == default]
    where = f"block={best['block']} warps={best['warps']} chunks={best['chunks']}"
    ok = all(r["same_tokens"] for r in records)
    return (
        f"sweep B={batch:>3} {mode:>6}: best {best['ms']:.4f} ms at {where}; default {at_default} ms; ok {ok}"
    )


def _table(result: dict) -> str:
    lines = [f"{result['device']}, V={VOCAB}, bf16 logits; median ms (triton.testing.do_bench)"]
    head = f"{'torch':>8} {'kernel':>8} {'tuned':>8} {'speedup':>8} {'copy':>7}"
    lines.append(f"{'B':>4} {'mode':>13} {'K':>2} {head} tokens max|dlp|")
    for r in result["paths"]:
        if "error" in r:
            lines.append(f"{r['batch']:>4} {r['mode']:>13} {r['logprobs']:>2} ERROR {r['error']}")
            continue
        speedup = r["torch_ms"] / r["kernel_ms"]  # of the default launch
        times = f"{r['torch_ms']:8.3f} {r['kernel_ms']:8.3f} {r['tuned_ms']:8.3f}"
        times += f" {speedup:7.1f}x {r['copy_ms']:7.3f}"
        check = f"{'same' if r['same_tokens'] else 'DIFF':>6} {r['max_logprob_err']:.1e}"
        lines.append(f"{r['batch']:>4} {r['mode']:>13} {r['logprobs']:>2} {times} {check}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."), help="folder for sampling_kernel.json")
    parser.add_argument("--sweep", action="store_true", help="also sweep the kernel's launch configurations")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
    }
    result["noise_mismatches"] = noise_mismatches(256)
    print(f"kernel noise vs rng.log_exponential at [256, {VOCAB}]: {result['noise_mismatches']}", flush=True)
    result["sweep"], result["paths"] = [], []
    tuned: dict[tuple[int, str], dict] = {}
    for batch in BATCHES if args.sweep else ():
        for mode in ("greedy", "t1"):
            try:
                records = sweep(batch, mode)
            except Exception:  # one broken configuration must not lose the rest of the run
                print(f"sweep B={batch} {mode} failed:\n{traceback.format_exc()}", flush=True)
                continue
            result["sweep"] += records
            tuned[batch, mode] = min(
                (r for r in records if r["same_tokens"]), key=lambda r: r["ms"], default=None
            )
            print(_sweep_line(batch, mode, records), flush=True)
    for batch in BATCHES:
        for mode in MODES:
            for k in (0, 5):
                try:
                    record = bench_paths(
                        batch, mode, k, tuned.get((batch, "greedy" if mode == "greedy" else "t1"))
                    )
                except Exception:
                    print(traceback.format_exc(), flush=True)
                    record = dict(
                        batch=batch, mode=mode, logprobs=k, error=traceback.format_exc().splitlines()[-1]
                    )
                result["paths"].append(record)
    (args.out / "sampling_kernel.json").write_text(json.dumps(result, indent=1))
    print(_table(result))


if __name__ == "__main__":
    main()
