"""RunnerConfig.small_batch_decode_rope under the interpreter: decode steps of at most
small_batch_gemv_rows rows run the q/k norm, RoPE and K/V store inside the decode attention launch
(``decode_attention_qkv``), with and without small_batch_decode_preload, and the engine's tokens
and logprobs match the two-launch path (Qwen3's q/k norms; none, with biases; a sliding window)."""

from __future__ import annotations

import pytest
import torch

import rollout.kernels.decode_attention as decode_attention
from rollout import LLM, CacheConfig, RunnerConfig, SamplingParams, SchedulerConfig
from tests.models.tiny_models import CASES, random_seqs, save_tiny_checkpoint

pytestmark = pytest.mark.usefixtures("interpreter_engine")


@pytest.mark.parametrize("case", ["qwen3", "llama_linear_rope_bias", "mistral_sliding"])
def test_decode_rope_steps_match_the_two_launch_path(tmp_path, case, monkeypatch):
    family, overrides, block_size = CASES[case]
    save_tiny_checkpoint(tmp_path, family, **overrides)
    prompts = random_seqs([11, 4, 19], seed=8)
    params = SamplingParams(max_tokens=6, temperature=0.8, seed=3, ignore_eos=True, logprobs=0)
    calls: list[tuple[int, bool]] = []
    real = decode_attention.decode_attention_qkv

    def counted(qkv, *args, **kw):
        calls.append((qkv.shape[0], kw.get("preload", False)))
        return real(qkv, *args, **kw)

    monkeypatch.setattr(decode_attention, "decode_attention_qkv", counted)
    outs = {}
    # the two-launch path, the fused launch, and the fused launch preloading its first K/V tile
    for name, fused, preload in (("two", False, False), ("fused", True, False), ("preload", True, True)):
        calls.clear()
        llm = LLM(
            str(tmp_path),
            device="cpu",
            cache_config=CacheConfig(block_size=block_size, num_blocks=64),
            scheduler_config=SchedulerConfig(max_num_batched_tokens=64),
            runner_config=RunnerConfig(
                attention_backend="triton",
                small_batch_gemv_rows=4,
                small_batch_decode_rope=fused,
                small_batch_decode_preload=preload,
                graph_sampling=False,  # eager decode steps (no uncaptured graphs)
                graph_inputs=False,
            ),
        )
        outs[name] = llm.generate(prompts, params, use_tqdm=False)
        layers = len(llm.engine.runner.model.model.layers)
        if fused:  # every decode step of 3 sequences (rows padded to at most 4), every layer
            assert len(calls) >= 5 * layers and {p for _, p in calls} == {preload}
            assert min(n for n, _ in calls) >= 3 and max(n for n, _ in calls) <= 4
        else:
            assert not calls
    for name in ("fused", "preload"):
        for a, b in zip(outs["two"], outs[name], strict=True):
            assert a.outputs[0].token_ids == b.outputs[0].token_ids, name
            diff = torch.tensor(a.outputs[0].logprobs) - torch.tensor(b.outputs[0].logprobs)
            assert diff.abs().max() <= 1e-4, name
