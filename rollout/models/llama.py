"""Llama 2 / 3 / 3.x (Llama-3 RoPE scaling comes from the config, see layers/rotary.py)."""

from __future__ import annotations

from typing import Any

from rollout.models.decoder import DecoderForCausalLM, DecoderSpec


class LlamaForCausalLM(DecoderForCausalLM):
    @staticmethod
    def decoder_spec(config: Any) -> DecoderSpec:
        # attention_bias covers q/k/v and o; mlp_bias covers gate/up/down. No sliding window:
        # HF's Llama ignores config.sliding_window.
        attention_bias = bool(getattr(config, "attention_bias", False))
        return DecoderSpec.from_hf(
            config,
            qkv_bias=attention_bias,
            o_bias=attention_bias,
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
        )
