"""Weights prefetched into L2 inside the decode graphs (run on the device machine): the prefetch
only reads, so the engine's outputs are bit-identical with it on and off, also after a sleep and
wake (the graphs and the prefetch's buffers are made again)."""

from __future__ import annotations

import pytest

from rollout import LLM, CacheConfig, RunnerConfig, SamplingParams
from tests.models.tiny_models import CASES, random_seqs, save_tiny_checkpoint

pytestmark = pytest.mark.gpu


def test_prefetch_in_decode_graphs_changes_no_output(tmp_path):
    family, overrides, block_size = CASES["qwen3"]
    save_tiny_checkpoint(tmp_path, family, **overrides)
    prompts = random_seqs([5, 19, 40, 7], seed=8)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2)
    results = {}
    for on in (False, True):
        llm = LLM(
            str(tmp_path),
            device="cuda",
            dtype="bfloat16",
            runner_config=RunnerConfig(prefetch_weights=on, prefetch_programs=8),
            cache_config=CacheConfig(block_size, num_blocks=256),
        )
        runner = llm.engine.runner
        assert runner.graphs is not None and (runner.prefetch is not None) == on
        results[on] = [llm.generate(prompts, params, use_tqdm=False)]
        llm.sleep(1)
        llm.wake_up()
        assert (runner.prefetch is not None) == on
        results[on].append(llm.generate(prompts, params, use_tqdm=False))
        if on:
            assert runner.prefetch.sink.any()  # the graphs' prefetch kernels ran
    for off_run, on_run in zip(results[False], results[True], strict=True):
        for a, b in zip(off_run, on_run, strict=True):
            assert a.outputs[0].token_ids == b.outputs[0].token_ids
            assert a.outputs[0].logprobs == b.outputs[0].logprobs
