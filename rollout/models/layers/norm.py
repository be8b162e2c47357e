"""RMSNorm with an optional fused residual add."""

from __future__ import annotations

import torch
from torch import nn

from rollout.models.layers.weight_utils import default_weight_loader, set_weight_loader


class RMSNorm(nn.Module):
    """``weight * (x / rms(x))`` over the last dim, with HF Llama/Qwen numerics: the statistics run in
    fp32, the normalized value is cast back to the input dtype BEFORE the weight multiply.

    ``forward(x)`` returns ``y``; ``forward(x, residual)`` first forms ``x = x + residual`` (in the
    input dtype, as HF's decoder layers do) and returns ``(norm(x), x)``: the new residual.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        # Triton kernel instead of the torch ops (same numerics up to summation order); the model
        # runner turns it on for CUDA (see RunnerConfig.fused_ops).
        self.fused = False
        # With ``fused``: steps of at most ``gemv_rows`` rows launch the kernel as a programmatic
        # dependent when ``gemv_pdl`` (the model's final norm, between the last layer's GEMV and
        # the LM head's; the model runner sets both from RunnerConfig.small_batch_gemv_*).
        self.gemv_rows = 0
        self.gemv_pdl = False
        self.weight = nn.Parameter(torch.ones(hidden_size))
        set_weight_loader(self.weight, default_weight_loader)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.fused and x.dim() == 2:
            from rollout.kernels.fused_ops import rms_norm

            pdl = self.gemv_pdl and 0 < x.shape[0] <= self.gemv_rows
            return rms_norm(x, self.weight, self.eps, residual, pdl=pdl)
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"
