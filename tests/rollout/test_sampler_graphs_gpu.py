"""Decode steps sampling in CUDA graphs of their own (RunnerConfig.graph_sampling) and taking their
inputs staged (RunnerConfig.graph_inputs), each and both (run on the device machine): the same tokens
as the eager sampler over copied inputs, logprobs within float32 summation order (the kernel splits
the vocabulary by the padded batch), top logprobs the same; batches the fused kernel cannot serve
alone (top-p, penalties, bans before min_tokens) still take the eager sampler. fp32 and bf16."""

from __future__ import annotations

import pytest
import torch

from rollout import LLM, CacheConfig, RunnerConfig, SamplingParams
from tests.models.tiny_models import CASES, random_seqs, save_tiny_checkpoint

pytestmark = pytest.mark.gpu


def _params(i: int) -> SamplingParams:
    """Four kinds of rows, mixed in one batch, ending at different steps (the graph size changes)."""
    common = dict(max_tokens=6 + 5 * (i % 4), ignore_eos=True, seed=100 + i)
    return [
        SamplingParams(temperature=0, logprobs=2, **common),
        SamplingParams(temperature=0.8, **common),
        SamplingParams(temperature=1.2, logprobs_mode="processed", **common),
        SamplingParams(temperature=0.7, logprobs=3, **common),
    ][i % 4]


OPTIONS = {  # both on: the defaults
    "off": dict(graph_sampling=False, graph_inputs=False),
    "sampling": dict(graph_sampling=True, graph_inputs=False),
    "inputs": dict(graph_sampling=False, graph_inputs=True),
    "both": dict(graph_sampling=True, graph_inputs=True),
}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_graph_sampling_gives_the_eager_samplers_tokens(tmp_path, dtype):
    family, overrides, block_size = CASES["qwen3"]
    save_tiny_checkpoint(tmp_path, family, **{**overrides, "max_position_embeddings": 512})
    prompts = random_seqs([5 + (7 * i) % 90 for i in range(37)], seed=5)
    fused = [_params(i) for i in range(len(prompts))]
    eager = [  # any one such row sends its whole batch to the eager sampler
        SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=12, ignore_eos=True, logprobs=1),
        SamplingParams(temperature=0.8, presence_penalty=0.5, seed=4, max_tokens=12, ignore_eos=True),
    ]
    # a stop token banned for the first 4 outputs: the eager sampler, then the graph's
    banned = SamplingParams(
        temperature=0.8, min_tokens=4, stop_token_ids=[299], seed=6, max_tokens=12, ignore_eos=True
    )
    results, replays = {}, {}
    for name, options in OPTIONS.items():
        on = bool(options.get("graph_sampling"))
        llm = LLM(
            str(tmp_path),
            device="cuda",
            dtype=dtype,
            runner_config=RunnerConfig(**options),
            cache_config=CacheConfig(block_size, num_blocks=2048),
        )
        runner = llm.engine.runner
        assert (runner.sampler_graphs is not None) == on
        assert runner.graphs is not None and runner.graphs.staged == bool(options.get("graph_inputs"))
        assert not runner.kv_cache.any()  # the captures stored no K/V (staged: an idle staging buffer)
        count = [0]
        if on:
            replay = runner.sampler_graphs.replay

            def counted(*args, _replay=replay, _count=count):
                _count[0] += 1
                return _replay(*args)

            runner.sampler_graphs.replay = counted
        outs = [llm.generate(prompts, fused, use_tqdm=False)]
        fused_replays = count[0]
        outs += [llm.generate(prompts[:9], [p] * 9, use_tqdm=False) for p in eager]
        eager_replays = count[0] - fused_replays
        outs.append(llm.generate(prompts[:9], [banned] * 9, use_tqdm=False))
        replays[name] = (fused_replays, eager_replays, count[0] - fused_replays - eager_replays)
        results[name] = [
            [(c.token_ids, c.logprobs, c.top_logprobs, c.finish_reason) for r in batch for c in r.outputs]
            for batch in outs
        ]
        llm.shutdown()
    assert replays["off"] == replays["inputs"] == (0, 0, 0)
    for name in ("sampling", "both"):
        fused_replays, eager_replays, banned_replays = replays[name]
        assert fused_replays >= 10 and eager_replays == 0  # the fused batch's decode steps; no others
        assert 1 <= banned_replays <= 8  # after the ban: outputs 5-12 (the stop token may end one)
    for name in OPTIONS:
        for on_batch, off_batch in zip(results[name], results["off"], strict=True):
            for got, want in zip(on_batch, off_batch, strict=True):
                (ids, lp, top, fin), (ids_off, lp_off, top_off, fin_off) = got, want
                assert ids == ids_off and fin == fin_off, name
                torch.testing.assert_close(lp, lp_off, rtol=0, atol=1e-4)
                assert (top is None) == (top_off is None)
                for a, b in zip(top or [], top_off or [], strict=True):  # each token's {id: logprob}
                    assert a.keys() == b.keys()  # (tied logits may come in another order)
                    torch.testing.assert_close([a[i] for i in b], list(b.values()), rtol=0, atol=1e-4)


def test_staged_inputs_beside_prompt_chunks(tmp_path):
    """A 40-token budget: prompts come in chunks beside the decodes (mixed and piecewise steps between
    the decode graph steps, decode-sized steps where a prompt's row does not sample), and the staged
    steps take their in-flight tokens from whichever kind of step sampled them."""
    from rollout import SchedulerConfig

    family, overrides, block_size = CASES["qwen3"]
    save_tiny_checkpoint(tmp_path, family, **{**overrides, "max_position_embeddings": 512})
    prompts = random_seqs([3 + (11 * i) % 70 for i in range(24)], seed=9)
    params = [_params(i) for i in range(len(prompts))]
    results = {}
    for on in (False, True):
        llm = LLM(
            str(tmp_path),
            device="cuda",
            dtype="bfloat16",
            runner_config=RunnerConfig(graph_inputs=on),
            scheduler_config=SchedulerConfig(max_num_batched_tokens=40, max_num_seqs=16),
            cache_config=CacheConfig(block_size, num_blocks=2048),
        )
        assert llm.engine.runner.graphs.staged == on
        outs = llm.generate(prompts, params, use_tqdm=False)
        results[on] = [(c.token_ids, c.logprobs, c.finish_reason) for r in outs for c in r.outputs]
        llm.shutdown()
    for (ids, lp, fin), (ids_off, lp_off, fin_off) in zip(results[True], results[False], strict=True):
        assert ids == ids_off and fin == fin_off
        torch.testing.assert_close(lp, lp_off, rtol=0, atol=1e-4)
