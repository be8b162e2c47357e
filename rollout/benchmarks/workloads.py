"""Workloads of BENCHMARKS.md, generated exactly as specified there."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Workload:
    name: str
    prompts: list[list[int]]  # token ids
    max_tokens: list[int]  # per prompt
    temperature: float

    @property
    def num_output_tokens(self) -> int:
        return sum(self.max_tokens)


def w1() -> Workload:
    """nano-vllm's bench: 256 prompts of 100-1024 random ids, 100-1024 output tokens each, T=0.6."""
    random.seed(0)
    prompts = [[random.randint(0, 10000) for _ in range(random.randint(100, 1024))] for _ in range(256)]
    max_tokens = [random.randint(100, 1024) for _ in range(256)]
    return Workload("w1", prompts, max_tokens, 0.6)


def peer256() -> Workload:
    """The HF peer's workload (shared/tools/hf_peer.py): 256 prompts of 100-1024 ids, 512 outputs, T=1."""
    rng = random.Random(0)
    prompts = [[rng.randrange(0, 10000) for _ in range(rng.randint(100, 1024))] for _ in range(256)]
    return Workload("peer256", prompts, [512] * 256, 1.0)


WORKLOADS = {"w1": w1, "peer256": peer256}


def decode_roofline_tok_s(
    work: Workload, weight_bytes: float, kv_bytes_per_token: float, bandwidth: float
) -> float:
    """Output tok/s if every request decodes from the first step on and each step only streams the
    weights once plus every running request's KV once at ``bandwidth`` (prefill ignored)."""
    lens = [len(p) for p in work.prompts]
    seconds = 0.0
    for t in range(max(work.max_tokens)):
        ctx = sum(n + t for n, m in zip(lens, work.max_tokens, strict=True) if m > t)
        seconds += (weight_bytes + ctx * kv_bytes_per_token) / bandwidth
    return work.num_output_tokens / seconds
