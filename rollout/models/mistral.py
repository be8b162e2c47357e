"""Mistral: Llama without biases, with ``config.sliding_window`` (when set) on every layer."""

from __future__ import annotations

from typing import Any

from rollout.models.decoder import DecoderForCausalLM, DecoderSpec


class MistralForCausalLM(DecoderForCausalLM):
    @staticmethod
    def decoder_spec(config: Any) -> DecoderSpec:
        window = getattr(config, "sliding_window", None)
        return DecoderSpec.from_hf(config, sliding_windows=(window,) * config.num_hidden_layers)
