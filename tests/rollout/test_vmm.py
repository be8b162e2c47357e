"""rollout.vmm without a GPU: the parameter layout and packing that sleep_keeps_graphs uses, its
argument checks, and an engine that asks for it on the CPU (where it changes nothing)."""

from __future__ import annotations

import pytest
import torch

from rollout import LLM, CacheConfig, RunnerConfig, SamplingParams
from rollout.vmm import VirtualMemory, pack_parameters, parameter_layout
from tests.models.tiny_models import random_seqs, save_tiny_checkpoint


def test_packed_parameters_share_one_buffer_and_keep_the_outputs(tmp_path):
    model = save_tiny_checkpoint(tmp_path, "qwen3", tie_word_embeddings=True)
    ids = torch.tensor([random_seqs([9], seed=1)[0]])
    want = model(ids).logits
    params = dict(model.named_parameters())
    offsets, total = parameter_layout(params)
    ends = sorted((offsets[n], offsets[n] + p.numel() * p.element_size()) for n, p in params.items())
    assert all(start % 256 == 0 for start, _ in ends) and ends[-1][1] <= total
    assert all(end <= nxt for (_, end), (nxt, _) in zip(ends[:-1], ends[1:], strict=True))  # no overlap
    flat = torch.full((total,), 255, dtype=torch.uint8)  # NaN bytes wherever nothing was copied
    pack_parameters(params, offsets, flat)
    base = flat.data_ptr()
    assert all(base <= p.data_ptr() < base + total for p in model.parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied: one Parameter
    assert torch.equal(model(ids).logits, want)


def test_virtual_memory_rejects_bad_arguments():
    with pytest.raises(ValueError, match="CUDA device"):
        VirtualMemory(1 << 20, "cpu")
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="nbytes >= 1, got 0"):
            VirtualMemory(0, "cuda")


def test_sleep_keeps_graphs_changes_nothing_on_the_cpu(tmp_path):
    save_tiny_checkpoint(tmp_path, "qwen3")
    llm = LLM(
        str(tmp_path),
        device="cpu",
        cache_config=CacheConfig(block_size=4, num_blocks=64),
        runner_config=RunnerConfig(sleep_keeps_graphs=True),
    )
    prompts = random_seqs([7, 12], seed=2)
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logprobs=0)
    first = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert llm.engine.runner.weight_memory is None  # no VMM off CUDA: the plain sleep
    llm.sleep(1)
    assert llm.engine.runner.kv_cache is None
    llm.wake_up()
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == first
