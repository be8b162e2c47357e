"""Piecewise CUDA graphs of the eager steps (run on the device machine): an engine that replays
them around eager attention gives what the eager forward gives, on steps that mix decodes,
prompt chunks and prefix-cache hits."""

from __future__ import annotations

import pytest
import torch

from rollout import LLM, CacheConfig, RunnerConfig, SamplingParams, SchedulerConfig
from tests.models.tiny_models import CASES, random_seqs, save_tiny_checkpoint

pytestmark = pytest.mark.gpu


def counted(forward, calls: list[int]):
    def wrapper(ids, positions, meta):
        calls.append(len(ids))
        return forward(ids, positions, meta)

    return wrapper


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_piecewise_graphs_match_the_eager_forward(tmp_path, dtype):
    family, overrides, block_size = CASES["qwen3"]
    save_tiny_checkpoint(tmp_path, family, **overrides)
    prompts = random_seqs([3, 9, 17, 33, 64, 5, 70, 12, 40, 2, 50, 90], seed=5)
    params = [
        SamplingParams(
            n=2,
            temperature=0,
            max_tokens=12 + 3 * i,
            ignore_eos=True,
            logprobs=1,
            prompt_logprobs=i % 2 or None,
        )
        for i in range(len(prompts))
    ]
    results, used = {}, {}
    for limit in (0, 2048):
        llm = LLM(
            str(tmp_path),
            device="cuda",
            dtype=dtype,
            runner_config=RunnerConfig(max_piecewise_tokens=limit, max_graph_batch=8),
            cache_config=CacheConfig(block_size, num_blocks=512),
            # 48-token steps: prompts arrive in chunks beside running decodes
            scheduler_config=SchedulerConfig(max_num_batched_tokens=48, max_num_seqs=12),
        )
        runner = llm.engine.runner
        assert (runner.pieces is not None) == bool(limit)
        calls: list[int] = []
        if runner.pieces is not None:
            runner.pieces.forward = counted(runner.pieces.forward, calls)
        results[limit] = llm.generate(prompts, params, use_tqdm=False)
        used[limit] = calls
        assert llm.stats().num_free_blocks == 512
    assert len(used[2048]) > 10 and max(used[2048]) == 48  # steps of up to 48 tokens went through them
    tol = 1e-4 if dtype == "float32" else 0.05
    for a, b in zip(results[0], results[2048], strict=True):
        for ca, cb in zip(a.outputs, b.outputs, strict=True):
            if dtype == "float32":
                assert ca.token_ids == cb.token_ids
            pairs = enumerate(zip(ca.token_ids, cb.token_ids, strict=True))
            n = next((i for i, (x, y) in pairs if x != y), len(ca.token_ids))
            la, lb = torch.tensor(ca.logprobs[:n]), torch.tensor(cb.logprobs[:n])
            assert (la - lb).abs().max() <= tol
        if a.prompt_logprobs is not None:
            pa = torch.tensor([lp for lp in a.prompt_logprobs if lp is not None])
            pb = torch.tensor([lp for lp in b.prompt_logprobs if lp is not None])
            assert (pa - pb).abs().max() <= tol


def test_piecewise_graphs_on_steps_above_2048_tokens(tmp_path):
    """The default limit covers whole admission steps (thousands of tokens): pieces there give the
    eager forward's tokens and logprobs."""
    family, overrides, block_size = CASES["qwen3"]
    save_tiny_checkpoint(tmp_path, family, **overrides)
    prompts = random_seqs([60 + (7 * i) % 50 for i in range(64)], seed=7)  # ~5,400 prompt tokens
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=1)
    default_limit = RunnerConfig().max_piecewise_tokens
    results, used = {}, {}
    for limit in (0, default_limit):
        llm = LLM(
            str(tmp_path),
            device="cuda",
            runner_config=RunnerConfig(max_piecewise_tokens=limit),
            cache_config=CacheConfig(block_size, num_blocks=2048),
            scheduler_config=SchedulerConfig(max_num_batched_tokens=4096, max_num_seqs=64),
        )
        calls: list[int] = []
        if llm.engine.runner.pieces is not None:
            llm.engine.runner.pieces.forward = counted(llm.engine.runner.pieces.forward, calls)
        results[limit] = llm.generate(prompts, params, use_tqdm=False)
        used[limit] = calls
    assert max(used[default_limit]) > 2048  # a step of thousands of tokens replayed the pieces
    for a, b in zip(results[0], results[default_limit], strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        la, lb = torch.tensor(a.outputs[0].logprobs), torch.tensor(b.outputs[0].logprobs)
        assert (la - lb).abs().max() <= 1e-4
