"""Token embedding and the LM head (optionally tied to it)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from rollout.models.layers.weight_utils import default_weight_loader, set_weight_loader

if TYPE_CHECKING:
    from rollout.kernels.gemv import GemvTiling


class VocabEmbedding(nn.Module):
    """``input_ids [T] -> [T, embedding_dim]``."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim))
        set_weight_loader(self.weight, default_weight_loader)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)


class LMHead(nn.Module):
    """``hidden [R, H] -> logits [R, vocab]`` in the model dtype.

    With ``tied_to``, the head registers the embedding's own Parameter object, so there is one
    storage: ``named_parameters()`` lists it once (under the embedding's name, registered first),
    ``.to()`` keeps it shared, and a weight update of the embedding updates the head.
    """

    def __init__(
        self, num_embeddings: int, embedding_dim: int, tied_to: VocabEmbedding | None = None
    ) -> None:
        super().__init__()
        if tied_to is not None:
            if (tied_to.num_embeddings, tied_to.embedding_dim) != (num_embeddings, embedding_dim):
                raise ValueError(
                    f"cannot tie a ({num_embeddings}, {embedding_dim}) head to a "
                    f"({tied_to.num_embeddings}, {tied_to.embedding_dim}) embedding"
                )
            self.weight = tied_to.weight
        else:
            self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim))
            set_weight_loader(self.weight, default_weight_loader)
        self.tied = tied_to is not None
        # Steps of at most this many rows run the head as ``kernels.gemv`` (a programmatic
        # dependent of the final norm with ``gemv_pdl``); the model runner sets both from
        # RunnerConfig.small_batch_gemv_* (triton backend). 0: always the GEMM.
        self.gemv_rows = 0
        self.gemv_pdl = False
        self.gemv_tiling: GemvTiling | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # The GEMM runs in the model dtype, as HF's lm_head does. The result stays in it: the sampling
        # kernel reads bf16 logits and computes in fp32, and the torch sampler upcasts (exactly);
        # an upcast copy here cost ~120 us per step at batch 256 on the H100.
        if 0 < hidden.shape[0] <= self.gemv_rows and hidden.is_contiguous():
            from rollout.kernels.gemv import fused_gemv

            return fused_gemv(hidden, self.weight, pdl=self.gemv_pdl, tiling=self.gemv_tiling)
        return F.linear(hidden, self.weight)
