"""Two-halves decode graphs (RunnerConfig.two_stream_decode_min_batch; run on the device machine):
the graphs that run their batch as two halves on two streams give the plain graphs' fp32 tokens
and logprobs within 1e-4 (the halves' GEMMs round differently), with the split merge kernel and
with the in-kernel merge (whose counters the halves must not share)."""

from __future__ import annotations

import pytest
import torch

from rollout import LLM, CacheConfig, RunnerConfig, SamplingParams
from tests.models.tiny_models import CASES, random_seqs, save_tiny_checkpoint

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("fused_merge", [False, True])
def test_two_halves_change_no_output(tmp_path, fused_merge):
    family, overrides, block_size = CASES["qwen3"]
    save_tiny_checkpoint(tmp_path, family, **overrides)
    prompts = random_seqs([5 + (13 * i) % 70 for i in range(30)], seed=3)  # ragged, 30 decoding
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=1)
    results, split_sizes = {}, []
    for min_batch in (0, 16):
        llm = LLM(
            str(tmp_path),
            device="cuda",
            dtype="float32",
            runner_config=RunnerConfig(
                max_graph_batch=32, two_stream_decode_min_batch=min_batch, fused_decode_merge=fused_merge
            ),
            cache_config=CacheConfig(block_size, num_blocks=512),
        )
        graphs = llm.engine.runner.graphs
        assert graphs is not None and (graphs.side is not None) == bool(min_batch)
        replay = graphs.replay

        def counted(size, *args, replay=replay, split_at=graphs.split_at, **kw):
            split_sizes.append(split_at(size))
            return replay(size, *args, **kw)

        graphs.replay = counted
        results[min_batch] = llm.generate(prompts, params, use_tqdm=False)
        if fused_merge:
            assert not llm.engine.runner.split_counters.any()
    assert split_sizes.count(16) > 5  # steps of 17-32 rows ran as two halves
    for a, b in zip(results[0], results[16], strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        la, lb = torch.tensor(a.outputs[0].logprobs), torch.tensor(b.outputs[0].logprobs)
        assert (la - lb).abs().max() <= 1e-4
