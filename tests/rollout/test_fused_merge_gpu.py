"""The in-kernel merge of split decode attention (run on the device machine): it sums the same
partials in another order, so fp32 tokens are identical and logprobs within 1e-5 with it on and
off, also after a sleep and wake (the graphs and their counters are made again), and every counter
is back to zero after each launch."""

from __future__ import annotations

import pytest

from rollout import LLM, CacheConfig, RunnerConfig, SamplingParams
from tests.models.tiny_models import CASES, random_seqs, save_tiny_checkpoint

pytestmark = pytest.mark.gpu


def test_fused_merge_changes_no_output(tmp_path):
    family, overrides, block_size = CASES["qwen3"]
    save_tiny_checkpoint(tmp_path, family, **overrides)
    prompts = random_seqs([5, 19, 40, 7], seed=8)  # batch 4: split decode launches
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2)
    results = {}
    for fused in (False, True):
        llm = LLM(
            str(tmp_path),
            device="cuda",
            dtype="float32",
            runner_config=RunnerConfig(fused_decode_merge=fused),
            cache_config=CacheConfig(block_size, num_blocks=256),
        )
        runner = llm.engine.runner
        assert runner.graphs is not None
        assert (runner.split_counters is not None) == fused
        results[fused] = [llm.generate(prompts, params, use_tqdm=False)]
        llm.sleep(1)
        llm.wake_up()
        results[fused].append(llm.generate(prompts, params, use_tqdm=False))
        if fused:
            assert not runner.split_counters.any()
    for off_run, on_run in zip(results[False], results[True], strict=True):
        for a, b in zip(off_run, on_run, strict=True):
            assert a.outputs[0].token_ids == b.outputs[0].token_ids
            diffs = [abs(x - y) for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, strict=True)]
            assert max(diffs) <= 1e-5
