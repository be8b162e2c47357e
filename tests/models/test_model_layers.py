"""Shared layers: HF numerics of RMSNorm and RoPE, and the packed weight loaders."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb

from rollout.models.layers.activation import SiluAndMul
from rollout.models.layers.embedding import LMHead, VocabEmbedding
from rollout.models.layers.linear import MergedLinear, QKVLinear, ReplicatedLinear
from rollout.models.layers.norm import RMSNorm
from rollout.models.layers.rotary import RopeParameters, RotaryEmbedding, apply_rotary
from tests.models.tiny_models import LLAMA3_ROPE, tiny_config


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_matches_hf_bitwise(dtype):
    torch.manual_seed(0)
    ours, ref = RMSNorm(64, eps=1e-5), LlamaRMSNorm(64, eps=1e-5)
    weight = torch.rand(64) + 0.5
    ours.weight.data.copy_(weight)
    ref.weight.data.copy_(weight)
    ours, ref = ours.to(dtype), ref.to(dtype)
    x, residual = torch.randn(7, 64, dtype=dtype) * 3, torch.randn(7, 64, dtype=dtype)
    assert torch.equal(ours(x), ref(x))
    y, new_residual = ours(x, residual)
    assert torch.equal(new_residual, residual + x)
    assert torch.equal(y, ref(residual + x))


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "default", "rope_theta": 10000.0},
        {"rope_type": "linear", "rope_theta": 500.0, "factor": 4.0},
        LLAMA3_ROPE,
    ],
    ids=lambda r: r["rope_type"],
)
def test_rotary_matches_hf(rope):
    torch.manual_seed(0)
    config = tiny_config("llama", rope_parameters=dict(rope))
    ref = LlamaRotaryEmbedding(config)
    ours = RotaryEmbedding(16, config.max_position_embeddings, RopeParameters.from_hf(config))
    positions = torch.randperm(128)[:40]
    q, k = torch.randn(40, 4, 16), torch.randn(40, 2, 16)
    cos, sin = ref(q, positions[None])
    ref_q, ref_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    cos_sin = ours(positions)
    torch.testing.assert_close(apply_rotary(q, *cos_sin), ref_q[0].transpose(0, 1), atol=1e-6, rtol=0)
    torch.testing.assert_close(apply_rotary(k, *cos_sin), ref_k[0].transpose(0, 1), atol=1e-6, rtol=0)


def test_rope_parameters_both_layouts():
    new = tiny_config("llama", rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 123.0})
    old = SimpleNamespace(
        rope_theta=123.0, rope_scaling={"type": "linear", "factor": 2.0}, max_position_embeddings=64
    )
    assert RopeParameters.from_hf(new) == RopeParameters.from_hf(old)
    assert RopeParameters.from_hf(SimpleNamespace(rope_theta=5.0, rope_scaling=None)).rope_type == "default"
    llama3 = dict(LLAMA3_ROPE, original_max_position_embeddings=None)
    parsed = RopeParameters.from_hf(SimpleNamespace(rope_parameters=llama3, max_position_embeddings=99))
    assert parsed.original_max_position_embeddings == 99


@pytest.mark.parametrize(
    "params, match",
    [
        ({"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}, "yarn"),
        ({"rope_type": "linear", "rope_theta": 1e4}, "factor"),
        ({"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}, "partial_rotary_factor"),
        ({"rope_type": "default"}, "rope_theta"),
    ],
)
def test_rope_parameters_rejects(params, match):
    with pytest.raises(ValueError, match=match):
        RopeParameters.from_hf(SimpleNamespace(rope_parameters=params, max_position_embeddings=64))


def test_qkv_linear_loads_shards_and_checks_shapes():
    layer = QKVLinear(hidden_size=8, head_dim=2, num_heads=4, num_kv_heads=2, bias=True)
    assert layer.weight.shape == (16, 8) and layer.weight.shard_ids == ("q", "k", "v")
    q, k, v = torch.randn(8, 8), torch.randn(4, 8), torch.randn(4, 8)
    ptr = layer.weight.data_ptr()
    for shard, tensor in (("v", v), ("q", q), (1, k)):  # any order; index or name
        layer.weight.weight_loader(layer.weight, tensor, shard)
    assert torch.equal(layer.weight.data, torch.cat([q, k, v])) and layer.weight.data_ptr() == ptr
    layer.bias.weight_loader(layer.bias, torch.arange(4.0), "k")
    assert torch.equal(layer.bias.data[8:12], torch.arange(4.0))
    with pytest.raises(ValueError, match="shard 'k'.*expected \\(4, 8\\), got \\(8, 8\\)"):
        layer.weight.weight_loader(layer.weight, q, "k")
    with pytest.raises(ValueError, match="unknown shard_id 'o'"):
        layer.weight.weight_loader(layer.weight, q, "o")


def test_merged_and_replicated_linear():
    merged = MergedLinear(4, (3, 3))
    gate, up = torch.randn(3, 4), torch.randn(3, 4)
    merged.weight.weight_loader(merged.weight, gate, 0)
    merged.weight.weight_loader(merged.weight, up, "up")
    x = torch.randn(5, 4)
    out = SiluAndMul()(merged(x))
    torch.testing.assert_close(out, torch.nn.functional.silu(x @ gate.T) * (x @ up.T))
    plain = ReplicatedLinear(4, 3)
    with pytest.raises(ValueError, match="expected \\(3, 4\\), got \\(4, 3\\)"):
        plain.weight.weight_loader(plain.weight, torch.randn(4, 3))
    with pytest.raises(ValueError, match="shard_id"):
        plain.weight.weight_loader(plain.weight, torch.randn(3, 4), "q")


def test_tied_lm_head_shares_the_embedding():
    embed = VocabEmbedding(10, 4)
    head = LMHead(10, 4, tied_to=embed)
    assert head.weight is embed.weight
    embed.weight.data.normal_()
    hidden = torch.randn(3, 4, dtype=torch.float64).to(torch.bfloat16)
    head, embed = head.to(torch.bfloat16), embed.to(torch.bfloat16)
    assert head.weight is embed.weight
    assert head(hidden).dtype == torch.bfloat16  # model dtype: the sampler upcasts
    with pytest.raises(ValueError, match="cannot tie"):
        LMHead(11, 4, tied_to=embed)


def test_rotary_table_ignores_the_default_device():
    # load_model builds models under `torch.device(target)`; the table is still computed on the CPU
    # (then moved by .to()), so every device gets the same values. `meta` stands in for CUDA here.
    rope = RopeParameters.from_hf(tiny_config("llama", rope_parameters=dict(LLAMA3_ROPE)))
    with torch.device("meta"):
        built = RotaryEmbedding(16, 128, rope)
    assert torch.equal(built.cos_sin_cache, RotaryEmbedding(16, 128, rope).cos_sin_cache)
