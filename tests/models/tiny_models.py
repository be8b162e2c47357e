"""Test helper: tiny random HF models of each supported family, saved as safetensors checkpoints."""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

CONFIG_CLASSES = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config, "mistral": MistralConfig}

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # Small, so the scaled band covers several of the 8 frequencies of head_dim 16.
    "original_max_position_embeddings": 16,
}

# name -> (family, config overrides, block_size)
CASES: dict[str, tuple[str, dict[str, Any], int]] = {
    "llama3_rope": ("llama", {"rope_parameters": LLAMA3_ROPE}, 4),
    "llama_tied": ("llama", {"tie_word_embeddings": True}, 16),
    "llama_linear_rope_bias": (
        "llama",
        {
            "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0},
            "attention_bias": True,
        },
        4,
    ),
    "qwen2_tied": ("qwen2", {"tie_word_embeddings": True}, 4),
    "qwen2_sliding": ("qwen2", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}, 16),
    "qwen3": ("qwen3", {}, 4),
    "mistral_sliding": ("mistral", {"sliding_window": 8}, 4),
}

# tiny_config("qwen3", ...) overrides for the benchmarks' CPU tests (config only, dummy weights): one
# layer, and a vocabulary that holds the benchmarks' random prompt ids (up to 10,000)
BENCH_SHAPE = MappingProxyType(
    dict(
        architectures=["Qwen3ForCausalLM"], hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=10240, tie_word_embeddings=True,
    )
)  # fmt: skip


def tiny_config(family: str, **overrides: Any):
    """hidden 64, 2 layers, 4 query heads / 2 KV heads (GQA) of dim 16, vocab 300, fp32."""
    kwargs = dict(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        eos_token_id=2,
        bos_token_id=1,
        dtype="float32",
    )
    kwargs.update(overrides)
    return CONFIG_CLASSES[family](**kwargs)


@torch.no_grad()
def tiny_hf_model(config, seed: int = 0) -> torch.nn.Module:
    """An eager-attention HF model whose every parameter (biases and norms included) is random and
    large enough that a mis-mapped weight moves the logits well past the tolerance."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    for name, param in model.named_parameters():
        param.uniform_(-0.2, 0.2)
        if "norm" in name:
            param.add_(1.0)
    return model.eval()


def save_tiny_checkpoint(path: Path, family: str, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """Save a tiny random checkpoint (config.json + safetensors) under ``path``; returns the HF model."""
    model = tiny_hf_model(tiny_config(family, **overrides), seed)
    model.save_pretrained(path)
    return model


@torch.no_grad()
def hf_logits(model: torch.nn.Module, seqs: list[list[int]]) -> list[torch.Tensor]:
    """Per sequence, HF's full-sequence logits [len, vocab] (one unpadded forward each)."""
    return [model(input_ids=torch.tensor([s])).logits[0].float() for s in seqs]


def random_seqs(lengths: list[int], vocab: int = 300, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]
