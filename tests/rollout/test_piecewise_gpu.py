"""CUDA graphs of the eager steps (run on the device machine): an engine that replays the piecewise
graphs around eager attention, or whole mixed-step graphs with graph-safe attention
(rollout/mixed_graphs.py), gives what the eager forward gives, on steps that mix decodes, prompt
chunks and prefix-cache hits."""

from __future__ import annotations

import pytest
import torch

from rollout import LLM, CacheConfig, RunnerConfig, SamplingParams, SchedulerConfig
from tests.models.tiny_models import CASES, random_seqs, save_tiny_checkpoint

pytestmark = pytest.mark.gpu


def count_replays(runner) -> list[int]:
    """The token counts of the steps that replay the runner's eager-step graphs (pieces or mixed),
    noted from now on: their ``forward`` takes the ids (pieces) or the size (mixed) first."""
    calls: list[int] = []

    def counted(forward):
        def wrapper(first, *args):
            calls.append(first if isinstance(first, int) else len(first))
            return forward(first, *args)

        return wrapper

    for step_graphs in (runner.pieces, runner.mixed):
        if step_graphs is not None:
            step_graphs.forward = counted(step_graphs.forward)
    return calls


EAGER = dict(max_piecewise_tokens=0, max_mixed_graph_tokens=0)  # no graph for steps with prompts
GRAPHS = {  # the eager steps' graphs under test: RunnerConfig fields
    "pieces": dict(max_piecewise_tokens=2048, max_mixed_graph_tokens=0),
    "mixed": dict(max_mixed_graph_tokens=2048, max_piecewise_tokens=0),
}


@pytest.mark.parametrize("graphs", ["pieces", "mixed"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_eager_step_graphs_match_the_eager_forward(tmp_path, dtype, graphs):
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
    for mode in ("eager", graphs):
        llm = LLM(
            str(tmp_path),
            device="cuda",
            dtype=dtype,
            runner_config=RunnerConfig(max_graph_batch=8, **GRAPHS.get(mode, EAGER)),
            cache_config=CacheConfig(block_size, num_blocks=512),
            # 48-token steps: prompts arrive in chunks beside running decodes
            scheduler_config=SchedulerConfig(max_num_batched_tokens=48, max_num_seqs=12),
        )
        runner = llm.engine.runner
        assert (runner.pieces is not None) == (mode == "pieces")
        assert (runner.mixed is not None) == (mode == "mixed")
        calls = count_replays(runner)
        results[mode] = llm.generate(prompts, params, use_tqdm=False)
        used[mode] = calls
        assert llm.stats().num_free_blocks == 512
    assert len(used[graphs]) > 10 and max(used[graphs]) == 48  # steps of up to 48 tokens went through them
    tol = 1e-4 if dtype == "float32" else 0.05
    for a, b in zip(results["eager"], results[graphs], strict=True):
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


@pytest.mark.parametrize("graphs", ["pieces", "mixed"])
def test_eager_step_graphs_on_steps_above_2048_tokens(tmp_path, graphs):
    """Whole admission steps (thousands of tokens; the pieces' default limit covers them) through
    the graphs give the eager forward's tokens and logprobs, in fp32. (In bf16 the 4,096-token
    mixed graph's 256 x 64 extend tiles round differently from the eager step's 128 x 32 tiles:
    logprobs ~0.015 apart, tokens equal; the H200 showed it, and the same run with 128-row tiles
    in the graph matched exactly.)"""
    family, overrides, block_size = CASES["qwen3"]
    save_tiny_checkpoint(tmp_path, family, **overrides)
    prompts = random_seqs([60 + (7 * i) % 50 for i in range(64)], seed=7)  # ~5,400 prompt tokens
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=1)
    limit = RunnerConfig().max_piecewise_tokens
    configs = {
        "eager": RunnerConfig(**EAGER),
        "pieces": RunnerConfig(max_mixed_graph_tokens=0),
        "mixed": RunnerConfig(max_mixed_graph_tokens=limit),
    }
    results, used = {}, {}
    for mode in ("eager", graphs):
        llm = LLM(
            str(tmp_path),
            device="cuda",
            dtype="float32",  # "auto" serves the fp32 checkpoint in bf16 on CUDA
            runner_config=configs[mode],
            cache_config=CacheConfig(block_size, num_blocks=2048),
            scheduler_config=SchedulerConfig(max_num_batched_tokens=4096, max_num_seqs=64),
        )
        runner = llm.engine.runner
        calls = count_replays(runner)
        results[mode] = llm.generate(prompts, params, use_tqdm=False)
        used[mode] = calls
    assert max(used[graphs]) > 2048, used[graphs]  # a step of thousands of tokens replayed the graphs
    differ = []  # (sequence, eager tokens, graph tokens, largest logprob difference)
    for i, (a, b) in enumerate(zip(results["eager"], results[graphs], strict=True)):
        la, lb = torch.tensor(a.outputs[0].logprobs), torch.tensor(b.outputs[0].logprobs)
        d = (la - lb).abs().max().item()
        if a.outputs[0].token_ids != b.outputs[0].token_ids or d > 1e-4:
            differ.append((i, a.outputs[0].token_ids, b.outputs[0].token_ids, d))
    assert not differ, (len(differ), differ[:4])


@pytest.mark.parametrize("keep", [False, True], ids=["recaptured", "kept"])
def test_mixed_graphs_after_sleep_and_wake(tmp_path, keep):
    """With ``sleep_keeps_graphs=False`` sleep drops the graphs with the KV cache and wake_up
    captures the mixed graphs again over the new storage; with it on (the default) the same graphs
    stay and replay over the storage mapped back at the same addresses. Either way they give the
    same tokens as before."""
    family, overrides, block_size = CASES["qwen3"]
    save_tiny_checkpoint(tmp_path, family, **overrides)
    prompts = random_seqs([3, 30, 64, 9, 45], seed=9)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=0)
    llm = LLM(
        str(tmp_path),
        device="cuda",
        dtype="float32",
        runner_config=RunnerConfig(
            max_mixed_graph_tokens=2048, max_piecewise_tokens=0, sleep_keeps_graphs=keep
        ),
        cache_config=CacheConfig(block_size, num_blocks=256),
        scheduler_config=SchedulerConfig(max_num_batched_tokens=32, max_num_seqs=8),
    )
    runner = llm.engine.runner
    before = llm.generate(prompts, params, use_tqdm=False)
    graphs = runner.mixed
    llm.sleep(1)
    assert (runner.mixed is graphs) if keep else (runner.mixed is None)
    llm.wake_up()
    assert runner.mixed is not None and runner.pieces is None
    assert (runner.mixed is graphs) == keep
    calls = count_replays(runner)
    after = llm.generate(prompts, params, use_tqdm=False)
    assert calls  # steps with prompt tokens replayed the graphs
    for a, b in zip(before, after, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        la, lb = torch.tensor(a.outputs[0].logprobs), torch.tensor(b.outputs[0].logprobs)
        assert (la - lb).abs().max() <= 1e-4
