"""W2's decode attention: the shared-prefix kernel against the plain decode kernel on GRPO-shaped
batches (prompts of 256-512 tokens, 8 samples each sharing the prompt's full blocks, outputs of
1-600 tokens so far), Qwen3-0.6B's heads, bf16, blocks of 16. Each launch runs in a CUDA graph over
disjoint copies of the problem (no L2 reuse between launches); GB/s counts the KV bytes each
kernel must read (the shared prefix once per group for the shared-prefix kernel).

    python -m rollout.benchmarks.shared_prefix [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random

import torch

from rollout.benchmarks.common import graph_ms
from rollout.kernels.decode_attention import decode_attention
from rollout.kernels.shared_prefix_decode import shared_prefix_decode, shared_prefix_groups

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 16, 8, 128, 16
DTYPE = torch.bfloat16


def grpo_tables(
    prompts: int, samples: int, out_max: int, seed: int
) -> tuple[list[list[int]], list[int], int]:
    """Block tables of ``prompts`` x ``samples`` rows sharing each prompt's full blocks, shuffled."""
    rng = random.Random(seed)
    tables, lens, used = [], [], 0
    for _ in range(prompts):
        prompt = rng.randint(256, 512)
        shared = list(range(used, used + prompt // BLOCK))
        used += len(shared)
        for _ in range(samples):
            length = prompt + rng.randint(1, out_max)
            own = -(-length // BLOCK) - len(shared)
            tables.append(shared + list(range(used, used + own)))
            used += own
            lens.append(length)
    order = list(range(len(lens)))
    rng.shuffle(order)
    return [tables[i] for i in order], [lens[i] for i in order], used


def bench(prompts: int, samples: int, out_max: int, max_members: int) -> dict:
    tables, lens, blocks = grpo_tables(prompts, samples, out_max, seed=prompts + out_max)
    per_token = 2 * KV_HEADS * HEAD_DIM * DTYPE.itemsize  # K and V of one position, one layer
    copies = max(2, min(16, (1 << 30) // (blocks * BLOCK * per_token)))
    gen = torch.Generator(device="cuda").manual_seed(0)
    shape = (copies * blocks, BLOCK, KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(shape, device="cuda", dtype=DTYPE, generator=gen)
    v_cache = torch.randn(shape, device="cuda", dtype=DTYPE, generator=gen)
    width = max(map(len, tables))
    base = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device="cuda")
    copy_tables = [base + c * blocks for c in range(copies)]
    batch = len(lens)
    q = torch.randn(batch, HEADS, HEAD_DIM, device="cuda", dtype=DTYPE, generator=gen)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    order = torch.tensor(sorted(range(batch), key=lambda i: -lens[i]), dtype=torch.int32, device="cuda")
    members, prefix_lens, starts = (
        torch.from_numpy(a).cuda() for a in shared_prefix_groups(tables, lens, BLOCK, max_members)
    )
    scale = HEAD_DIM**-0.5

    def plain(c):
        return decode_attention(q, k_cache, v_cache, copy_tables[c], seq_lens, scale, order=order)

    def shared(c):
        return shared_prefix_decode(
            q, k_cache, v_cache, copy_tables[c], seq_lens, members, prefix_lens, starts, scale
        )

    want, got = plain(0).double(), shared(0).double()
    plain_us, shared_us = (1e3 * graph_ms(fn, range(copies)) for fn in (plain, shared))
    plain_bytes = sum(lens) * per_token
    shared_bytes = (sum(lens) - int(starts.sum()) + int(prefix_lens.sum())) * per_token
    return dict(
        batch=batch,
        samples=samples,
        out_max=out_max,
        max_members=max_members,
        plain_us=round(plain_us, 1),
        shared_us=round(shared_us, 1),
        speedup=round(plain_us / shared_us, 3),
        plain_gbs=round(plain_bytes / plain_us / 1e3),
        shared_gbs=round(shared_bytes / shared_us / 1e3),
        bytes_ratio=round(shared_bytes / plain_bytes, 3),
        rel_err=((got - want).norm() / want.norm()).item(),
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    rows = []
    for prompts, out_max in ((32, 64), (32, 300), (32, 600), (16, 600), (8, 600)):
        for max_members in (8, 4):
            row = bench(prompts, 8, out_max, max_members)
            rows.append(row)
            print(row, flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "shared_prefix.json"), "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
