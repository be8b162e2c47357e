"""Qwen2 / Qwen2.5: biased q/k/v (not o), optional sliding window on the upper layers."""

from __future__ import annotations

from typing import Any

from rollout.models.decoder import DecoderForCausalLM, DecoderSpec, windows_from_layer_types


class Qwen2ForCausalLM(DecoderForCausalLM):
    @staticmethod
    def decoder_spec(config: Any) -> DecoderSpec:
        return DecoderSpec.from_hf(config, qkv_bias=True, sliding_windows=windows_from_layer_types(config))
