"""The RL bench's step breakdown: each engine step is counted as decode-only or mixed by the batch it
collected (decode-only steps also by batch size), and every token a step computed is counted once."""

from __future__ import annotations

import time

import pytest

from rollout import LLM, CacheConfig, SamplingParams, SchedulerConfig
from rollout.benchmarks.rl import step_kinds, summarize_steps


@pytest.mark.parametrize("overlap", [False, True])
def test_rl_bench_splits_steps_into_decode_only_and_mixed(overlap):
    llm = LLM(
        "tiny",
        device="cpu",
        cache_config=CacheConfig(num_blocks=64),
        scheduler_config=SchedulerConfig(max_num_batched_tokens=16, overlap=overlap),
    )
    steps = step_kinds(llm)
    start = time.perf_counter()
    prompts = [[5] * 20, [7] * 9]  # 29 prompt tokens: two 16-token budgets, then decodes
    llm.generate(prompts, SamplingParams(max_tokens=6, ignore_eos=True), use_tqdm=False)
    s = summarize_steps(steps, start)
    assert s["mixed"]["steps"] == 2 and s["mixed"]["tokens"] == 29  # 16, then 4 + 9
    assert s["decode_only"]["steps"] >= 5
    # computed tokens: every prompt token once, then one per output token after the first
    assert s["mixed"]["tokens"] + s["decode_only"]["tokens"] == 29 + 2 * 6 - 2
    assert all(s[k]["seconds"] > 0 and s[k]["mean_ms"] > 0 for k in s)
    # two sequences decode together: every decode-only step is in the smallest batch bucket, but
    # for the overlapped loop's first step, which collected nothing
    assert s["decode_batch_1-8"]["steps"] == s["decode_only"]["steps"] - overlap
    if not overlap:
        assert s["decode_batch_1-8"]["seconds"] == s["decode_only"]["seconds"]
    assert set(s) == {"decode_only", "mixed", "decode_batch_1-8"}


def test_steps_that_collected_nothing_count_in_no_batch_bucket():
    """With the overlapped loop the first step only launches (it collects nothing): it counts as
    decode-only time, in no batch bucket."""
    start = 0.0
    steps = [(0.010, False, 40), (0.012, True, 3), (0.014, True, 0)]
    s = summarize_steps(steps, start)
    assert s["decode_only"]["steps"] == 2 and s["decode_only"]["tokens"] == 3
    assert s["decode_batch_1-8"]["steps"] == 1
    assert abs(s["decode_only"]["seconds"] - 0.004) < 1e-12
