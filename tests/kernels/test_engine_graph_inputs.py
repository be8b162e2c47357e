"""RunnerConfig.graph_inputs under the interpreter: decode graph steps take their inputs in one
copy, unpacked by the graph's first kernel (uncaptured without CUDA, over the same staging buffer
as on the GPU), with the overlapped loop's in-flight tokens read from ``last_tokens``. The engine's
tokens and logprobs must match the eager steps', with eager and mixed steps (prompt chunks) in
between, the graph size changing, steps where a row does not sample, the sampler graphs on, and
``last_tokens`` refilled when it does not hold the step in flight's tokens. The captured graphs:
tests/rollout/test_sampler_graphs_gpu.py."""

from __future__ import annotations

import pytest
import torch

from rollout import LLM, CacheConfig, RunnerConfig, SamplingParams, SchedulerConfig
from tests.models.tiny_models import CASES, random_seqs, save_tiny_checkpoint

pytestmark = pytest.mark.usefixtures("interpreter_engine")


def run(path, block_size, prompts, params, forget_every: int = 0, **options):
    """Outputs of one engine, (staged, every row samples, in-flight rows) per decode graph step, and
    the number of sampler graph replays."""
    llm = LLM(
        str(path),
        device="cpu",
        cache_config=CacheConfig(block_size=block_size, num_blocks=96),
        scheduler_config=SchedulerConfig(max_num_batched_tokens=6, max_num_seqs=8, overlap=True),
        runner_config=RunnerConfig(attention_backend="triton", **options),
    )
    runner = llm.engine.runner
    steps: list[tuple[bool, bool, int]] = []
    prepare, launch = runner._prepare, runner.launch

    def recorded(batch, num_rows, prev=None, pad_rows=False, mixed=None, graph_layout=False):
        host = prepare(batch, num_rows, prev, pad_rows, mixed, graph_layout)
        if batch.num_tokens == len(batch.requests) and runner.graphs is not None:
            steps.append((graph_layout, host.samples_lead, host.num_placeholders))
        return host

    calls = [0]

    def forgetting(batch, prev=None):
        calls[0] += 1
        if calls[0] % forget_every == 0:
            # as after graphs captured again (a new, zeroed last_tokens): it must be refilled
            runner._tokens_of = None
            runner.graphs.last_tokens.zero_()
        return launch(batch, prev)

    runner._prepare = recorded
    if forget_every:
        runner.launch = forgetting
    sampled = [0]
    if runner.sampler_graphs is not None:
        replay = runner.sampler_graphs.replay

        def counted(*args):
            sampled[0] += 1
            return replay(*args)

        runner.sampler_graphs.replay = counted
    outs = llm.generate(prompts, params, use_tqdm=False)
    llm.shutdown()
    return [(c.token_ids, c.logprobs, c.top_logprobs) for r in outs for c in r.outputs], steps, sampled[0]


def test_staged_graph_steps_match_eager_steps(tmp_path):
    family, overrides, block_size = CASES["qwen3"]
    save_tiny_checkpoint(tmp_path, family, **overrides)
    # 6-token steps: the long prompt comes in chunks beside the decodes of the short ones, 1 token
    # beside 5 decodes making decode-sized steps where a row does not sample
    prompts = random_seqs([2, 2, 2, 2, 2, 9], seed=5)
    common = dict(ignore_eos=True)
    params = [
        SamplingParams(temperature=0, logprobs=2, max_tokens=16, **common),
        SamplingParams(temperature=0.8, seed=7, max_tokens=12, **common),
        SamplingParams(temperature=1.2, seed=8, logprobs_mode="processed", max_tokens=10, **common),
        SamplingParams(temperature=0.7, seed=9, top_p=0.9, max_tokens=5, **common),  # eager sampler
        SamplingParams(temperature=0.9, seed=10, max_tokens=8, **common),
        SamplingParams(temperature=0, max_tokens=6, **common),
    ]
    off = dict(graph_inputs=False, graph_sampling=False)
    want, eager_steps, _ = run(tmp_path, block_size, prompts, params, **off)
    assert not eager_steps  # no decode graphs without CUDA when neither option is on
    runs = {  # every third step with last_tokens clobbered first: it must be refilled
        "inputs": run(tmp_path, block_size, prompts, params, forget_every=3, graph_sampling=False),
        "inputs+sampling": run(tmp_path, block_size, prompts, params),  # the defaults
    }
    assert runs["inputs+sampling"][2] >= 3 and runs["inputs"][2] == 0  # its tokens into last_tokens
    for name, (got, steps, _) in runs.items():
        staged = [s for s in steps if s[0]]
        assert len(staged) >= 8, name
        assert any(placeholders for _, _, placeholders in staged), name  # in-flight tokens read
        assert any(not lead for _, lead, _ in staged), name  # a row that does not sample
        assert len({placeholders for _, _, placeholders in staged}) >= 3, name  # the size changes
        for (ids, lp, top), (ids_want, lp_want, top_want) in zip(got, want, strict=True):
            assert ids == ids_want, name
            torch.testing.assert_close(lp, lp_want, rtol=0, atol=1e-4)
            assert (top is None) == (top_want is None)
            for a, b in zip(top or [], top_want or [], strict=True):
                assert list(a) == list(b)
                torch.testing.assert_close(list(a.values()), list(b.values()), rtol=0, atol=1e-4)


def test_capture_stores_nothing_and_refuses_oversized_steps(tmp_path):
    """The runs before each graph size's capture read an idle staging buffer: padding rows that store
    no K/V (a zeroed buffer would store row 0 at slot 0 of the cache). A step that does not fit the
    staging buffer is refused before anything is copied."""
    family, overrides, block_size = CASES["qwen3"]
    save_tiny_checkpoint(tmp_path, family, **overrides)
    llm = LLM(
        str(tmp_path),
        device="cpu",
        cache_config=CacheConfig(block_size=block_size, num_blocks=16),
        scheduler_config=SchedulerConfig(max_num_batched_tokens=16, max_num_seqs=16),
        runner_config=RunnerConfig(attention_backend="triton"),  # graph_inputs by default
    )
    runner = llm.engine.runner
    graphs = runner.graphs
    assert graphs.staged and graphs.sizes == [1, 2, 4, 8, 16]  # 8, 16: the store kernel before attention
    assert not runner.kv_cache.any()
    before = graphs.staging.clone()
    too_wide = torch.zeros(10, dtype=torch.long)
    with pytest.raises(ValueError, match="width"):
        graphs.replay_staged(1, too_wide, graphs.max_blocks + 1)
    with pytest.raises(ValueError, match="exceed"):
        graphs.replay_staged(1, torch.zeros(graphs.staging.shape[0] + 1, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="int64"):
        graphs.replay_staged(1, too_wide.int(), 1)
    assert torch.equal(graphs.staging, before)
    ids = torch.zeros(1, dtype=torch.long)
    with pytest.raises(ValueError, match="replay_staged"):  # the copying replay's buffers go unread
        graphs.replay(1, ids, ids, ids, ids, ids.view(1, 1), ids)
    llm.shutdown()
