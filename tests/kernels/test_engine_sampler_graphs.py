"""RunnerConfig.graph_sampling under the interpreter: decode steps sample through the sampler graphs
(uncaptured without CUDA, over the same static buffers as on the GPU, behind uncaptured decode
graphs), and the engine's tokens and logprobs match the eager sampler's; a batch with a row the
fused kernel cannot serve alone (top-p) takes the eager sampler. The captured graphs:
tests/rollout/test_sampler_graphs_gpu.py."""

from __future__ import annotations

import pytest
import torch

from rollout import LLM, CacheConfig, RunnerConfig, SamplingParams, SchedulerConfig
from tests.models.tiny_models import CASES, random_seqs, save_tiny_checkpoint

pytestmark = pytest.mark.usefixtures("interpreter_engine")


def test_graph_sampled_steps_match_the_eager_sampler(tmp_path):
    family, overrides, block_size = CASES["qwen3"]
    vocab = save_tiny_checkpoint(tmp_path, family, **overrides).config.vocab_size
    prompts = random_seqs([9, 3, 14, 5, 7], seed=2)
    common = dict(ignore_eos=True)
    fused = [  # mixed in one batch, ending at different steps (3 -> 2 -> 1 rows: the graph size changes)
        SamplingParams(temperature=0, logprobs=2, max_tokens=6, **common),
        SamplingParams(temperature=0.8, seed=7, max_tokens=3, **common),
        SamplingParams(temperature=1.2, seed=8, logprobs_mode="processed", max_tokens=5, **common),
        SamplingParams(temperature=0.7, seed=9, logprobs=3, max_tokens=4, **common),
        SamplingParams(temperature=0.9, seed=10, max_tokens=6, **common),
    ]
    top_p = SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=4, logprobs=1, **common)
    # a stop token banned for the first two outputs: the eager sampler, then the graph's
    banned = SamplingParams(
        temperature=0.8, seed=4, max_tokens=4, min_tokens=2, stop_token_ids=[vocab - 1], **common
    )
    results, replays = {}, {}
    for on in (False, True):
        llm = LLM(
            str(tmp_path),
            device="cpu",
            cache_config=CacheConfig(block_size=block_size, num_blocks=64),
            scheduler_config=SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8),
            runner_config=RunnerConfig(attention_backend="triton", graph_sampling=on, graph_inputs=False),
        )
        runner = llm.engine.runner
        assert (runner.sampler_graphs is not None) == on and (runner.graphs is not None) == on
        calls: list[tuple[int, int, int]] = []
        if on:
            replay = runner.sampler_graphs.replay

            def counted(size, rows, k, _replay=replay, _calls=calls):
                _calls.append((size, rows, k))
                return _replay(size, rows, k)

            runner.sampler_graphs.replay = counted
        outs = llm.generate(prompts, fused, use_tqdm=False)
        fused_calls = list(calls)
        outs += llm.generate(prompts[:3], top_p, use_tqdm=False)
        top_p_calls = calls[len(fused_calls) :]
        outs += llm.generate(prompts[:2], banned, use_tqdm=False)
        replays[on] = (fused_calls, top_p_calls, calls[len(fused_calls) + len(top_p_calls) :])
        results[on] = [(c.token_ids, c.logprobs, c.top_logprobs) for r in outs for c in r.outputs]
        llm.shutdown()
    fused_calls, top_p_calls, banned_calls = replays[True]
    # every decode step of the fused batch (5 tokens after the first of the longest), k = 3 while
    # the row asking for 3 runs; none for the top-p batch; the banned batch's last two tokens
    assert len(fused_calls) >= 5 and not top_p_calls and banned_calls == [(2, 2, 0)] * 2
    assert {rows for _, rows, _ in fused_calls} >= {5, 2} and fused_calls[0] == (8, 5, 3)
    assert all(size >= rows for size, rows, _ in fused_calls)
    for (ids, lp, top), (ids_off, lp_off, top_off) in zip(results[True], results[False], strict=True):
        assert ids == ids_off
        torch.testing.assert_close(lp, lp_off, rtol=0, atol=1e-4)
        assert (top is None) == (top_off is None)
        for a, b in zip(top or [], top_off or [], strict=True):
            assert list(a) == list(b)
            torch.testing.assert_close(list(a.values()), list(b.values()), rtol=0, atol=1e-4)
