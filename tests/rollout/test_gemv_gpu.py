"""Fused small-batch GEMVs in the engine (RunnerConfig.small_batch_gemv_rows; run on the device
machine): decode graphs of up to 8 rows run the fused projections and give the unfused engine's
fp32 tokens, logprobs within 1e-4; in bf16 logprobs within bf16 noise. As programmatic dependent
launches (small_batch_gemv_pdl), or with a software-pipelined loop (small_batch_gemv_stages), they
give exactly the same outputs; with whole-K tiles (small_batch_gemv_whole_k) the unfused engine's
fp32 tokens again; with the q/k norm + RoPE + K/V
store in the decode attention (small_batch_decode_rope, the default) or in a launch of its own, the
same fp32 tokens and logprobs within 1e-4."""

from __future__ import annotations

import pytest
import torch

from rollout import LLM, CacheConfig, RunnerConfig, SamplingParams
from tests.models.tiny_models import CASES, random_seqs, save_tiny_checkpoint

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", ["qwen3", "llama_linear_rope_bias"])
def test_fused_gemv_graphs_match_the_unfused_engine(tmp_path, case, dtype):
    family, overrides, block_size = CASES[case]
    save_tiny_checkpoint(tmp_path, family, **overrides)
    prompts = random_seqs([5, 19, 40, 7, 12, 3], seed=9)  # decode batches of 6: fused
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=1)
    configs = {
        "unfused": RunnerConfig(small_batch_gemv_rows=0),
        "gemv": RunnerConfig(small_batch_gemv_rows=8, small_batch_gemv_pdl=False),
        "gemv_pdl": RunnerConfig(small_batch_gemv_rows=8, small_batch_gemv_pdl=True),
        "own_rope": RunnerConfig(small_batch_gemv_rows=8, small_batch_decode_rope=False),
        "whole_k": RunnerConfig(small_batch_gemv_rows=8, small_batch_gemv_whole_k=True),
        "stages": RunnerConfig(
            small_batch_gemv_rows=8, small_batch_gemv_stages=3, small_batch_gemv_whole_k=False
        ),
    }
    results = {}
    for name, config in configs.items():
        llm = LLM(
            str(tmp_path),
            device="cuda",
            dtype=dtype,
            runner_config=config,
            cache_config=CacheConfig(block_size, num_blocks=256),
        )
        layer = llm.engine.runner.model.model.layers[0]
        assert layer.gemv_rows == config.small_batch_gemv_rows
        assert layer.gemv_pdl == config.small_batch_gemv_pdl
        results[name] = llm.generate(prompts, params, use_tqdm=False)
    for a, b, c in zip(results["unfused"], results["gemv"], results["gemv_pdl"], strict=True):
        ta, tb = a.outputs[0].token_ids, b.outputs[0].token_ids
        if dtype == "float32":
            assert ta == tb
        n = next((i for i, (x, y) in enumerate(zip(ta, tb, strict=True)) if x != y), len(ta))
        la, lb = torch.tensor(a.outputs[0].logprobs[:n]), torch.tensor(b.outputs[0].logprobs[:n])
        assert (la - lb).abs().max() <= (1e-4 if dtype == "float32" else 0.05)
        # programmatic dependent launches change when kernels start, not what they compute
        assert (c.outputs[0].token_ids, c.outputs[0].logprobs) == (tb, b.outputs[0].logprobs)
    for c, s in zip(results["gemv_pdl"], results["stages"], strict=True):  # pipelining: same sums
        assert (s.outputs[0].token_ids, s.outputs[0].logprobs) == (
            c.outputs[0].token_ids,
            c.outputs[0].logprobs,
        )
    for a, w in zip(results["unfused"], results["whole_k"], strict=True):  # K summed in one tile
        ta, tw = a.outputs[0].token_ids, w.outputs[0].token_ids
        if dtype == "float32":
            assert ta == tw
        n = next((i for i, (x, y) in enumerate(zip(ta, tw, strict=True)) if x != y), len(ta))
        la, lw = torch.tensor(a.outputs[0].logprobs[:n]), torch.tensor(w.outputs[0].logprobs[:n])
        assert (la - lw).abs().max() <= (1e-4 if dtype == "float32" else 0.05)
    if dtype == "float32":
        for c, d in zip(results["gemv_pdl"], results["own_rope"], strict=True):
            assert c.outputs[0].token_ids == d.outputs[0].token_ids
            diff = torch.tensor(c.outputs[0].logprobs) - torch.tensor(d.outputs[0].logprobs)
            assert diff.abs().max() <= 1e-4


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("lengths", [[19], [5, 40, 7]], ids=["1row", "3rows"])
def test_gemv_tilings_at_one_to_four_rows(tmp_path, dtype, lengths):
    """The broadcast (1-4 row) GEMV path, where GemvTiling's whole-K tiles and pipelined loop apply
    (6 rows take tensor-core tiles above): the unfused engine's fp32 tokens, logprobs within 1e-4
    (bf16: within bf16 noise up to the first differing token); the pipelined loop bit for bit."""
    family, overrides, block_size = CASES["qwen3"]
    save_tiny_checkpoint(tmp_path, family, **overrides)
    prompts = random_seqs(lengths, seed=3)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=1)
    configs = {
        "unfused": RunnerConfig(small_batch_gemv_rows=0),
        "gemv": RunnerConfig(small_batch_gemv_rows=4, small_batch_gemv_whole_k=False),
        "whole_k": RunnerConfig(small_batch_gemv_rows=4, small_batch_gemv_whole_k=True),
        "stages": RunnerConfig(
            small_batch_gemv_rows=4, small_batch_gemv_stages=3, small_batch_gemv_whole_k=False
        ),
    }
    results = {}
    for name, config in configs.items():
        llm = LLM(
            str(tmp_path), device="cuda", dtype=dtype, runner_config=config,
            cache_config=CacheConfig(block_size, num_blocks=256),
        )  # fmt: skip
        results[name] = [
            (o.outputs[0].token_ids, o.outputs[0].logprobs) for o in llm.generate(prompts, params)
        ]
    assert results["stages"] == results["gemv"]
    for name in ("gemv", "whole_k"):
        for (ta, la), (tb, lb) in zip(results["unfused"], results[name], strict=True):
            if dtype == "float32":
                assert ta == tb, name
            n = next((i for i, (x, y) in enumerate(zip(ta, tb, strict=True)) if x != y), len(ta))
            diff = (torch.tensor(la[:n]) - torch.tensor(lb[:n])).abs().max()
            assert diff <= (1e-4 if dtype == "float32" else 0.05), name
