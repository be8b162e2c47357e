"""Rotary position embedding (neox / HF Llama style: the head dim is split in two halves).

One ``RotaryEmbedding`` per model holds a ``[max_position, head_dim]`` table (cos of the
``head_dim / 2`` frequencies, then their sin). The model looks up its rows once per forward and every
layer applies them with ``apply_rotary``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeParameters:
    """RoPE settings read from an HF config (either layout, see ``from_hf``)."""

    rope_type: str  # one of SUPPORTED_ROPE_TYPES
    theta: float  # base wavelength
    factor: float = 1.0  # "linear" / "llama3": how much the context was stretched
    low_freq_factor: float = 1.0  # "llama3" only
    high_freq_factor: float = 4.0  # "llama3" only
    original_max_position_embeddings: int = 8192  # "llama3": pretraining context length

    @classmethod
    def from_hf(cls, config: Any) -> RopeParameters:
        """Read ``config.rope_parameters`` (transformers >= 5: a dict holding ``rope_theta`` and
        ``rope_type``) or the older ``config.rope_theta`` + ``config.rope_scaling`` (whose type key
        is ``rope_type`` or ``type``). Raises ``ValueError`` for unsupported or per-layer RoPE."""
        params: dict[str, Any] = {**(getattr(config, "rope_scaling", None) or {})}
        params.update(getattr(config, "rope_parameters", None) or {})
        if any(isinstance(v, dict) for v in params.values()):
            raise ValueError(f"per-layer-type rope_parameters are not supported: {params}")
        rope_type = params.get("rope_type", params.get("type")) or "default"
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"unsupported rope type {rope_type!r}; supported: {SUPPORTED_ROPE_TYPES}")
        theta = params.get("rope_theta", getattr(config, "rope_theta", None))
        if theta is None:
            raise ValueError("config has no rope_theta (neither in rope_parameters nor at the top level)")
        partial = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None))
        if partial not in (None, 1, 1.0):
            raise ValueError(f"partial_rotary_factor={partial} is not supported")
        required = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor")}
        missing = [key for key in required.get(rope_type, ()) if key not in params]
        if missing:
            raise ValueError(f"rope type {rope_type!r} needs {missing}: {params}")
        scaling: dict[str, Any] = {key: float(params[key]) for key in required.get(rope_type, ())}
        if rope_type == "llama3":
            # transformers falls back to max_position_embeddings the same way.
            original = params.get("original_max_position_embeddings") or config.max_position_embeddings
            scaling["original_max_position_embeddings"] = int(original)
        return cls(rope_type=rope_type, theta=float(theta), **scaling)


def rope_inv_freq(rope: RopeParameters, head_dim: int) -> torch.Tensor:
    """The ``head_dim / 2`` inverse frequencies (fp32, CPU), computed as transformers does so the
    tables agree to the bit."""
    # Pinned to the CPU: models are built under a `torch.device(...)` context (see loader.py).
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").to(torch.float32) / head_dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        old_len = rope.original_max_position_embeddings
        low_freq_wavelen = old_len / rope.low_freq_factor
        high_freq_wavelen = old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths are stretched by `factor`, short ones kept, the band between interpolated.
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """``positions [T] -> (cos, sin)``, each ``[T, head_dim / 2]`` in the table's dtype.

    The table is a non-persistent buffer: it follows ``.to(device, dtype)`` (cast to the model dtype
    like HF casts its cos/sin to the activations' dtype) and stays out of ``state_dict``.
    """

    def __init__(self, head_dim: int, max_position: int, rope: RopeParameters) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary head_dim must be even, got {head_dim}")
        self.head_dim, self.max_position, self.rope = head_dim, max_position, rope
        # Built on the CPU in fp32 whatever the default device is, so every device gets the same table.
        inv_freq = rope_inv_freq(rope, head_dim)
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float32, device="cpu"), inv_freq)
        self.register_buffer("cos_sin_cache", torch.cat((freqs.cos(), freqs.sin()), dim=-1), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.cos_sin_cache[positions].chunk(2, dim=-1)
        return cos, sin

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, max_position={self.max_position}, {self.rope}"


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [T, H, D]`` by ``cos/sin [T, D/2]``: the same products and sums, in the same dtype
    and order, as HF's ``x * cos + rotate_half(x) * sin``."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
