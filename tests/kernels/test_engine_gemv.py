"""RunnerConfig.small_batch_gemv_rows under the interpreter: steps of at most that many rows run
each layer's projections through the fused small-batch GEMVs (norms and SiLU-and-mul folded in),
and the engine's tokens and logprobs match the unfused triton path (with and without biases)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import rollout.kernels.gemv as gemv
from rollout import LLM, CacheConfig, RunnerConfig, SamplingParams, SchedulerConfig
from tests.models.tiny_models import CASES, random_seqs, save_tiny_checkpoint

pytestmark = pytest.mark.usefixtures("interpreter_engine")


@pytest.mark.parametrize("case", ["qwen3", "llama_linear_rope_bias"])
def test_fused_gemv_steps_match_the_unfused_path(tmp_path, case, monkeypatch):
    family, overrides, block_size = CASES[case]
    vocab = save_tiny_checkpoint(tmp_path, family, **overrides).config.vocab_size
    prompts = random_seqs([11, 4, 19], seed=6)
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logprobs=0)
    calls: list[int] = []
    head_calls: list[int] = []  # the LM head's (a [vocab, hidden] weight)
    real = gemv.fused_gemv

    def counted(x, weight, *args, **kw):
        (head_calls if weight.shape[0] == vocab else calls).append(x.shape[0])
        return real(x, weight, *args, **kw)

    monkeypatch.setattr(gemv, "fused_gemv", counted)
    outs = {}
    configs = {  # the other ways to read the weights (GemvTiling) too
        "unfused": RunnerConfig(small_batch_gemv_rows=0),
        "gemv": RunnerConfig(small_batch_gemv_rows=4, small_batch_gemv_whole_k=False),
        "whole_k": RunnerConfig(small_batch_gemv_rows=4, small_batch_gemv_whole_k=True),
        "stages": RunnerConfig(
            small_batch_gemv_rows=4, small_batch_gemv_stages=2, small_batch_gemv_whole_k=False
        ),
    }
    for name, config in configs.items():
        llm = LLM(
            str(tmp_path),
            device="cpu",
            cache_config=CacheConfig(block_size=block_size, num_blocks=64),
            scheduler_config=SchedulerConfig(max_num_batched_tokens=64),
            runner_config=dataclasses.replace(  # eager decode steps (no uncaptured graphs)
                config, attention_backend="triton", graph_sampling=False, graph_inputs=False
            ),
        )
        layer = llm.engine.runner.model.model.layers[0]
        assert (layer.gemv_tiling.whole_k, layer.gemv_tiling.stages) == (
            config.small_batch_gemv_whole_k,
            config.small_batch_gemv_stages,
        )
        calls.clear()
        head_calls.clear()
        outs[name] = llm.generate(prompts, params, use_tqdm=False)
        layers = len(llm.engine.runner.model.model.layers)
        if name == "unfused":
            assert not calls and not head_calls
        else:  # 4 per layer, 3+ decode steps, and the LM head of those steps
            assert calls and max(calls) <= 4 and len(calls) >= 4 * layers * 3
            assert len(head_calls) >= 3 and max(head_calls) <= 4
    for name in ("gemv", "whole_k", "stages"):
        for a, b in zip(outs["unfused"], outs[name], strict=True):
            assert a.outputs[0].token_ids == b.outputs[0].token_ids
            diff = torch.tensor(a.outputs[0].logprobs) - torch.tensor(b.outputs[0].logprobs)
            assert diff.abs().max() <= 1e-4, name


def test_bad_gemv_rows_are_refused():
    with pytest.raises(ValueError, match="small_batch_gemv_rows must be in \\[0, 16\\], got 17"):
        RunnerConfig(small_batch_gemv_rows=17)
