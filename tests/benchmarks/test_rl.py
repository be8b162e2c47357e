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


def test_rl_bench_warm_up_leaves_no_prompt_cached(monkeypatch, tmp_path):
    """W2's "prompt tokens computed": each prompt once, plus the last partial block once per further
    sample; the warm-up (the first 4 prompts) must not have computed any of them beforehand."""
    import json
    import random

    import torch

    from rollout.benchmarks import rl
    from tests.models.tiny_models import BENCH_SHAPE, tiny_config

    model = tmp_path / "model"
    model.mkdir()
    tiny_config("qwen3", max_position_embeddings=8192, **BENCH_SHAPE).save_pretrained(model)  # dummy weights
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    # short outputs: the lengths are not what is checked
    monkeypatch.setattr(rl.random.Random, "expovariate", lambda self, lambd: 0.0)
    rl.main(["--model", str(model), "--num-prompts", "4", "--n", "2", "--out", str(tmp_path),
             "--piecewise-tokens", "0", "--mixed-graph-tokens", "0"])  # fmt: skip
    res = json.loads((tmp_path / "rl.json").read_text())
    rng = random.Random(0)
    lens = [len([rng.randrange(100, 10000) for _ in range(rng.randint(256, 512))]) for _ in range(4)]
    assert res["prompt_tokens_submitted"] == 2 * sum(lens)
    assert res["prompt_tokens_computed"] == sum(n + (n - (n - 1) // 16 * 16) for n in lens)
