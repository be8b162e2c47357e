"""Decode attention as programmatic dependent launches at every decode step size
(RunnerConfig.decode_attention_pdl; run on the device machine): the q/k norm + RoPE + store kernel,
the split attention and its merge start early and wait for their inputs, so the outputs are
exactly those of plain launches: split batches (a few rows) and unsplit ones (many rows), greedy
and seeded sampling, fp32 and bf16."""

from __future__ import annotations

import pytest

from rollout import LLM, CacheConfig, RunnerConfig, SamplingParams
from tests.models.tiny_models import CASES, random_seqs, save_tiny_checkpoint

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dependent_decode_launches_change_no_output(tmp_path, dtype):
    family, overrides, block_size = CASES["qwen3"]
    save_tiny_checkpoint(tmp_path, family, **{**overrides, "max_position_embeddings": 512})  # 300 + 20
    few = random_seqs([5, 190, 40, 7, 300, 3], seed=3)
    many = random_seqs([4 + i % 37 for i in range(200)], seed=4)
    greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=1)
    seeded = SamplingParams(temperature=0.8, top_p=0.9, seed=11, max_tokens=20, ignore_eos=True, logprobs=1)
    results = {}
    for pdl in (False, True):
        llm = LLM(
            str(tmp_path),
            device="cuda",
            dtype=dtype,
            # no fused GEMVs: every decode step takes the path under test
            runner_config=RunnerConfig(small_batch_gemv_rows=0, decode_attention_pdl=pdl),
            cache_config=CacheConfig(block_size, num_blocks=4096),
        )
        assert all(m.decode_pdl == pdl for m in llm.engine.runner.model.modules() if hasattr(m, "decode_pdl"))
        results[pdl] = [
            [(c.token_ids, c.logprobs) for r in llm.generate(ps, params, use_tqdm=False) for c in r.outputs]
            for ps in (few, many)
            for params in (greedy, seeded)
        ]
    assert results[True] == results[False]
