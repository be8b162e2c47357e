"""An engine whose decode steps read each GRPO group's shared prompt blocks once
(``RunnerConfig(shared_prefix_members=N)``) gives the torch backend's tokens and logprobs, and its
steps did share prefixes (under the Triton interpreter on CPU: the eager decode path)."""

from __future__ import annotations

import pytest

from rollout import LLM, CacheConfig, RunnerConfig, SamplingParams, SchedulerConfig
from tests.models.tiny_models import CASES, random_seqs, save_tiny_checkpoint

pytestmark = pytest.mark.usefixtures("triton_interpreter")


def test_shared_prefix_decode_engine_matches_the_torch_backend(tmp_path, monkeypatch):
    from rollout.kernels import shared_prefix_decode as spd

    shared_lens: list[int] = []
    groups = spd.shared_prefix_groups

    def recorded(*args, **kwargs):
        out = groups(*args, **kwargs)
        shared_lens.extend(out[1].tolist())
        return out

    monkeypatch.setattr(spd, "shared_prefix_groups", recorded)
    family, overrides, block_size = CASES["qwen3"]
    save_tiny_checkpoint(tmp_path, family, **overrides)
    prompts = random_seqs([37, 21, 50], seed=4)  # two or more full blocks each
    params = SamplingParams(n=4, temperature=0.8, seed=3, max_tokens=12, ignore_eos=True, logprobs=0)
    outs = {}
    for backend, members in (("torch", 0), ("triton", 3)):
        llm = LLM(
            str(tmp_path),
            device="cpu",
            cache_config=CacheConfig(block_size, num_blocks=256),
            scheduler_config=SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=16),
            runner_config=RunnerConfig(attention_backend=backend, shared_prefix_members=members),
        )
        outs[backend] = llm.generate(prompts, params, use_tqdm=False)
        assert llm.stats().num_free_blocks == 256
    assert shared_lens and max(shared_lens) >= 2 * block_size  # groups shared their prompts' blocks
    for a, b in zip(outs["torch"], outs["triton"], strict=True):
        for ca, cb in zip(a.outputs, b.outputs, strict=True):
            assert ca.token_ids == cb.token_ids
            assert max(abs(x - y) for x, y in zip(ca.logprobs, cb.logprobs, strict=True)) < 1e-4
