"""Model families, shared layers and weight loading (HF checkpoint names in, paged-KV forward out)."""

from rollout.models.config import ModelConfig
from rollout.models.loader import load_model
from rollout.models.registry import get_model_class, supported_architectures

__all__ = ["ModelConfig", "get_model_class", "load_model", "supported_architectures"]
