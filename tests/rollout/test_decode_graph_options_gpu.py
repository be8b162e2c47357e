"""Decode-graph options (run on the device machine): the L2 weight prefetch only reads, so outputs
are bit-identical with it on and off; the in-kernel merge of split decode attention sums the same
partials in another order, so fp32 tokens are identical and logprobs within 1e-5. Both also after
a sleep and wake (the graphs and their buffers are made again)."""

from __future__ import annotations

import pytest

from rollout import LLM, CacheConfig, RunnerConfig, SamplingParams
from tests.models.tiny_models import CASES, random_seqs, save_tiny_checkpoint

pytestmark = pytest.mark.gpu

OPTIONS = {
    "prefetch": dict(prefetch_weights=True, prefetch_programs=8),
    "fused_merge": dict(fused_decode_merge=True),
}


@pytest.mark.parametrize("option", list(OPTIONS))
def test_decode_graph_options_change_no_output(tmp_path, option):
    family, overrides, block_size = CASES["qwen3"]
    save_tiny_checkpoint(tmp_path, family, **overrides)
    prompts = random_seqs([5, 19, 40, 7], seed=8)  # batch 4: split decode launches
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2)
    results = {}
    for on in (False, True):
        llm = LLM(
            str(tmp_path),
            device="cuda",
            dtype="float32",
            runner_config=RunnerConfig(**(OPTIONS[option] if on else {})),
            cache_config=CacheConfig(block_size, num_blocks=256),
        )
        runner = llm.engine.runner
        assert runner.graphs is not None
        assert (runner.prefetch is not None) == (on and option == "prefetch")
        assert (runner.split_counters is not None) == (on and option == "fused_merge")
        results[on] = [llm.generate(prompts, params, use_tqdm=False)]
        llm.sleep(1)
        llm.wake_up()
        results[on].append(llm.generate(prompts, params, use_tqdm=False))
        if on and option == "prefetch":
            assert runner.prefetch is not None and runner.prefetch.sink.any()  # its kernels ran
        if on and option == "fused_merge":
            assert not runner.split_counters.any()
    for off_run, on_run in zip(results[False], results[True], strict=True):
        for a, b in zip(off_run, on_run, strict=True):
            assert a.outputs[0].token_ids == b.outputs[0].token_ids
            diffs = [abs(x - y) for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, strict=True)]
            assert max(diffs) == 0.0 if option == "prefetch" else max(diffs) <= 1e-5
