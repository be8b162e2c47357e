"""Qwen3 (dense): per-head RMSNorm on q and k before RoPE; no q/k/v bias unless attention_bias."""

from __future__ import annotations

from typing import Any

from rollout.models.decoder import DecoderForCausalLM, DecoderSpec, windows_from_layer_types


class Qwen3ForCausalLM(DecoderForCausalLM):
    @staticmethod
    def decoder_spec(config: Any) -> DecoderSpec:
        attention_bias = bool(getattr(config, "attention_bias", False))
        return DecoderSpec.from_hf(
            config,
            qkv_bias=attention_bias,
            o_bias=attention_bias,
            qk_norm=True,
            sliding_windows=windows_from_layer_types(config),
        )
