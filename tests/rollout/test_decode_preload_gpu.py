"""Small decode steps whose attention loads its first K/V tile before waiting for the qkv projection
(RunnerConfig.small_batch_decode_preload; run on the device machine): the captured chain of
dependent launches gives the tokens of the path without it. fp32, where the only difference (64- in
place of 128-position tiles) moves the logprobs by rounding alone; the kernel's bitwise equality at
one config, in every dtype, is tests/kernels/test_decode_attention.py's."""

from __future__ import annotations

import pytest
import torch

from rollout import LLM, CacheConfig, RunnerConfig, SamplingParams, SchedulerConfig
from tests.models.tiny_models import CASES, random_seqs, save_tiny_checkpoint

pytestmark = pytest.mark.gpu


def test_preloaded_first_tile_changes_no_token(tmp_path):
    family, overrides, block_size = CASES["qwen3"]
    save_tiny_checkpoint(tmp_path, family, **{**overrides, "max_position_embeddings": 512})
    # at most 4 running (the small-step path), contexts from one tile to several per split
    prompts = random_seqs([5, 190, 40, 7, 300, 3, 129, 64], seed=3)
    params = [
        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=1),
        SamplingParams(temperature=0.8, seed=11, max_tokens=24, ignore_eos=True, logprobs=1),
    ]
    results = {}
    for preload in (False, True):
        llm = LLM(
            str(tmp_path),
            device="cuda",
            dtype="float32",
            runner_config=RunnerConfig(small_batch_decode_preload=preload),
            scheduler_config=SchedulerConfig(max_num_seqs=4),
            cache_config=CacheConfig(block_size, num_blocks=2048),
        )
        modules = [m for m in llm.engine.runner.model.modules() if hasattr(m, "decode_preload")]
        assert modules and all(m.decode_preload == preload for m in modules)
        outs = [r for p in params for r in llm.generate(prompts, p, use_tqdm=False)]
        results[preload] = [(c.token_ids, c.logprobs) for r in outs for c in r.outputs]
        llm.shutdown()
    for (ids, lp), (ids_pre, lp_pre) in zip(results[False], results[True], strict=True):
        assert ids == ids_pre
        torch.testing.assert_close(lp, lp_pre, rtol=0, atol=1e-4)
