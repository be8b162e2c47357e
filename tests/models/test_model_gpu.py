"""The same model paths on a CUDA device: construction under a device context, fp32 parity, bf16
loading, in-place loads into device memory, dummy weights with a device generator."""

from __future__ import annotations

import pytest
import torch

from rollout.models import ModelConfig, load_model
from tests.models.paged_kv import SeqChunk, assign_blocks, build_step
from tests.models.tiny_models import hf_logits, random_seqs, save_tiny_checkpoint

pytestmark = pytest.mark.gpu


@torch.no_grad()
def cuda_prefill_logits(model, seqs, block_size=4, num_blocks=64):
    dtype = next(model.parameters()).dtype
    for attn in model.attention_layers():
        shape = (num_blocks, block_size, attn.num_kv_heads, attn.head_dim)
        attn.k_cache = torch.randn(shape, device="cuda").to(dtype)
        attn.v_cache = torch.randn(shape, device="cuda").to(dtype)
    blocks = assign_blocks([len(s) for s in seqs], block_size, num_blocks)
    input_ids, positions, meta = build_step(
        [SeqChunk(s, 0, len(s), b) for s, b in zip(seqs, blocks, strict=True)], block_size
    )
    for field in ("slot_mapping", "block_tables", "seq_lens", "query_start_loc"):
        setattr(meta, field, getattr(meta, field).cuda())
    return model.compute_logits(model(input_ids.cuda(), positions.cuda(), meta)).float().cpu()


@pytest.mark.parametrize("family, overrides", [("llama", {}), ("qwen3", {"tie_word_embeddings": True})])
def test_cuda_load_matches_hf(tmp_path, family, overrides):
    hf = save_tiny_checkpoint(tmp_path, family, **overrides)
    seqs = random_seqs([5, 17, 33])
    ref = torch.cat(hf_logits(hf, seqs))
    fp32 = load_model(ModelConfig.from_pretrained(tmp_path, dtype="float32", device="cuda"), "cuda")
    assert {p.device.type for p in fp32.parameters()} == {"cuda"}
    assert fp32.model.rotary_emb.cos_sin_cache.device.type == "cuda"
    torch.testing.assert_close(cuda_prefill_logits(fp32, seqs), ref, atol=1e-4, rtol=1e-4)

    config = ModelConfig.from_pretrained(tmp_path, device="cuda")
    assert config.dtype == torch.bfloat16  # "auto" on CUDA for an fp32 checkpoint
    bf16 = load_model(config, "cuda")
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    assert torch.get_default_dtype() == torch.float32
    torch.testing.assert_close(cuda_prefill_logits(bf16, seqs), ref, atol=0.15, rtol=0.05)

    ptrs = [p.data_ptr() for p in bf16.parameters()]
    bf16.load_weights((name, t.float()) for name, t in hf.state_dict().items())  # cast + host->device
    assert [p.data_ptr() for p in bf16.parameters()] == ptrs


def test_cuda_dummy_weights(tmp_path):
    save_tiny_checkpoint(tmp_path, "mistral", sliding_window=8)
    config = ModelConfig.from_pretrained(tmp_path, device="cuda")
    a = load_model(config, "cuda", load_format="dummy", seed=1)
    b = load_model(config, "cuda", load_format="dummy", seed=1)
    assert torch.equal(a.lm_head.weight, b.lm_head.weight)
    assert torch.isfinite(cuda_prefill_logits(a, random_seqs([3, 9]))).all()
