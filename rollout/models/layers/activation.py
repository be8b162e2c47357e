"""Gated activations."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SiluAndMul(nn.Module):
    """``[..., 2 * d]`` packed (gate, up) -> ``silu(gate) * up`` of shape ``[..., d]``."""

    def __init__(self) -> None:
        super().__init__()
        self.fused = False  # Triton kernel (the model runner turns it on for CUDA)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and x.dim() == 2:
            from rollout.kernels.fused_ops import silu_and_mul

            return silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
