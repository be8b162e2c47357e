"""HF ``architectures`` name -> model class."""

from __future__ import annotations

from types import MappingProxyType

from rollout.models.decoder import DecoderForCausalLM
from rollout.models.llama import LlamaForCausalLM
from rollout.models.mistral import MistralForCausalLM
from rollout.models.qwen2 import Qwen2ForCausalLM
from rollout.models.qwen3 import Qwen3ForCausalLM

_MODELS = MappingProxyType(
    {
        "LlamaForCausalLM": LlamaForCausalLM,
        "MistralForCausalLM": MistralForCausalLM,
        "Qwen2ForCausalLM": Qwen2ForCausalLM,
        "Qwen3ForCausalLM": Qwen3ForCausalLM,
    }
)


def supported_architectures() -> tuple[str, ...]:
    return tuple(sorted(_MODELS))


def get_model_class(architecture: str) -> type[DecoderForCausalLM]:
    """The class for ``architecture``; ``ValueError`` naming it and the supported list if unknown."""
    try:
        return _MODELS[architecture]
    except KeyError:
        raise ValueError(
            f"unsupported architecture {architecture!r}; supported: {', '.join(supported_architectures())}"
        ) from None
