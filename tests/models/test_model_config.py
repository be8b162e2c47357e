"""ModelConfig: fields from config.json / generation_config.json, dtype resolution, validation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rollout.models import ModelConfig, get_model_class, supported_architectures
from rollout.models.config import resolve_dtype
from tests.models.tiny_models import tiny_config


def save(tmp_path, family, **overrides):
    tiny_config(family, **overrides).save_pretrained(tmp_path)
    return tmp_path


def test_fields(tmp_path):
    arch = ["MistralForCausalLM"]
    config = ModelConfig.from_pretrained(
        save(tmp_path, "mistral", sliding_window=8, architectures=arch), device="cpu"
    )
    assert config.architecture == "MistralForCausalLM"
    assert (config.vocab_size, config.hidden_size, config.num_layers) == (300, 64, 2)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (4, 2, 16)
    assert config.max_model_len == 128 and config.sliding_window == 8
    assert config.eos_token_ids == (2,) and config.dtype == torch.float32
    assert config.path == str(tmp_path)


def test_sliding_window_only_when_every_layer_slides():
    mixed = tiny_config(
        "qwen2",
        use_sliding_window=True,
        sliding_window=8,
        max_window_layers=1,
        architectures=["Qwen2ForCausalLM"],
    )
    assert ModelConfig.from_hf(mixed).sliding_window is None
    llama = tiny_config("llama", architectures=["LlamaForCausalLM"])
    assert ModelConfig.from_hf(llama).sliding_window is None


def test_eos_from_generation_config(tmp_path):
    save(tmp_path, "llama", architectures=["LlamaForCausalLM"], eos_token_id=[2, 3])
    assert ModelConfig.from_pretrained(tmp_path).eos_token_ids == (2, 3)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 7}))
    assert ModelConfig.from_pretrained(tmp_path).eos_token_ids == (7,)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 6]}))
    assert ModelConfig.from_pretrained(tmp_path).eos_token_ids == (5, 6)


def test_max_model_len(tmp_path):
    save(tmp_path, "llama", architectures=["LlamaForCausalLM"])
    assert ModelConfig.from_pretrained(tmp_path, max_model_len=64).max_model_len == 64
    with pytest.raises(ValueError, match="max_model_len=129"):
        ModelConfig.from_pretrained(tmp_path, max_model_len=129)
    with pytest.raises(ValueError, match="max_model_len=0"):
        ModelConfig.from_pretrained(tmp_path, max_model_len=0)
    for bad in (1.5, True, "64"):  # 1.5 made the engine's token limit a float
        with pytest.raises(ValueError, match="max_model_len="):
            ModelConfig.from_pretrained(tmp_path, max_model_len=bad)
    assert ModelConfig.from_pretrained(tmp_path, max_model_len=np.int64(32)).max_model_len == 32


def test_unknown_architecture(tmp_path):
    save(tmp_path, "llama", architectures=["FooForCausalLM"])
    with pytest.raises(ValueError, match="FooForCausalLM.*LlamaForCausalLM"):
        ModelConfig.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="FooForCausalLM"):
        get_model_class("FooForCausalLM")
    assert set(supported_architectures()) == {
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
    }
    with pytest.raises(ValueError, match="architectures"):
        ModelConfig.from_hf(tiny_config("llama"))


def test_unsupported_activation_and_rope():
    with pytest.raises(ValueError, match="gelu"):
        ModelConfig.from_hf(tiny_config("llama", hidden_act="gelu", architectures=["LlamaForCausalLM"]))
    yarn = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4, "original_max_position_embeddings": 32}
    with pytest.raises(ValueError, match="yarn"):
        ModelConfig.from_hf(tiny_config("llama", rope_parameters=yarn, architectures=["LlamaForCausalLM"]))


@pytest.mark.parametrize(
    "requested, saved, device, expected",
    [
        ("auto", "bfloat16", "cpu", torch.float32),
        ("auto", "bfloat16", "cuda", torch.bfloat16),
        ("auto", "float16", "cuda:1", torch.float16),
        ("auto", "float32", "cuda", torch.bfloat16),
        ("float32", "bfloat16", "cuda", torch.float32),
        ("bf16", "float32", "cpu", torch.bfloat16),
        (torch.float16, "float32", "cpu", torch.float16),
    ],
)
def test_resolve_dtype(requested, saved, device, expected):
    assert resolve_dtype(requested, tiny_config("llama", dtype=saved), device) == expected


def test_resolve_dtype_rejects():
    with pytest.raises(ValueError, match="int8"):
        resolve_dtype("int8", tiny_config("llama"), "cpu")
    with pytest.raises(ValueError, match="float64"):
        resolve_dtype(torch.float64, tiny_config("llama"), "cpu")
