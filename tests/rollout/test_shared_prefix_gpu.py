"""Shared-prefix decoding in the decode graphs (run on the device machine): GRPO groups read their
prompt blocks once per group, and the engine gives the tokens and logprobs (fp32) it gives
without, also after a sleep and wake (the graphs and their group buffers are made again)."""

from __future__ import annotations

import pytest

from rollout import LLM, CacheConfig, RunnerConfig, SamplingParams, SchedulerConfig
from tests.models.tiny_models import CASES, random_seqs, save_tiny_checkpoint

pytestmark = pytest.mark.gpu


def test_shared_prefix_decode_graphs_match(tmp_path):
    family, overrides, block_size = CASES["qwen3"]
    save_tiny_checkpoint(tmp_path, family, **overrides)
    prompts = random_seqs([70, 45, 90, 33], seed=12)
    params = SamplingParams(n=8, temperature=0.9, seed=5, max_tokens=24, ignore_eos=True, logprobs=0)
    results = {}
    for members in (0, 8):
        llm = LLM(
            str(tmp_path),
            device="cuda",
            dtype="float32",
            runner_config=RunnerConfig(shared_prefix_members=members),
            cache_config=CacheConfig(block_size, num_blocks=512),
            scheduler_config=SchedulerConfig(max_num_seqs=64),
        )
        runner = llm.engine.runner
        assert runner.graphs is not None and (runner.graphs.prefix is not None) == bool(members)
        results[members] = [llm.generate(prompts, params, use_tqdm=False)]
        if members:  # the last decode step's groups are still in the graphs' buffers
            assert int(runner.graphs.prefix[1].max()) >= 2 * block_size
        llm.sleep(1)
        llm.wake_up()
        results[members].append(llm.generate(prompts, params, use_tqdm=False))
    for plain_run, shared_run in zip(results[0], results[8], strict=True):
        for a, b in zip(plain_run, shared_run, strict=True):
            for ca, cb in zip(a.outputs, b.outputs, strict=True):
                assert ca.token_ids == cb.token_ids
                assert max(abs(x - y) for x, y in zip(ca.logprobs, cb.logprobs, strict=True)) <= 1e-4
