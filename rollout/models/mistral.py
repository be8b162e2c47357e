"""Mistral: Llama without biases, with ``config.sliding_window`` (when set) on every layer, or on the
layers ``config.layer_types`` marks as sliding (Ministral-style configs)."""

from __future__ import annotations

from typing import Any

from rollout.models.decoder import DecoderForCausalLM, DecoderSpec, windows_from_layer_types


class MistralForCausalLM(DecoderForCausalLM):
    @staticmethod
    def decoder_spec(config: Any) -> DecoderSpec:
        if getattr(config, "layer_types", None):  # transformers 5 reads these as Ministral: per layer
            return DecoderSpec.from_hf(config, sliding_windows=windows_from_layer_types(config))
        window = getattr(config, "sliding_window", None)
        return DecoderSpec.from_hf(config, sliding_windows=(window,) * config.num_hidden_layers)
