"""Linear layers whose parameters know how to load HF checkpoint tensors, packed or not."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from rollout.models.layers.weight_utils import check_shape, default_weight_loader, set_weight_loader


class ReplicatedLinear(nn.Module):
    """``y = x W^T (+ b)`` with whole-tensor weight loading."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        super().__init__()
        self.input_size, self.output_size = input_size, output_size
        self.weight = nn.Parameter(torch.empty(output_size, input_size))
        set_weight_loader(self.weight, default_weight_loader)
        if bias:
            self.bias = nn.Parameter(torch.zeros(output_size))
            set_weight_loader(self.bias, default_weight_loader)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class MergedLinear(nn.Module):
    """Several linears over the same input packed along the output dim (one GEMM instead of N).

    Shard ``i`` (addressable by index or by ``shard_names[i]``) owns output rows
    ``offsets[i]:offsets[i] + output_sizes[i]`` of the weight and bias.
    """

    def __init__(
        self,
        input_size: int,
        output_sizes: Sequence[int],
        bias: bool = False,
        shard_names: Sequence[str] = ("gate", "up"),
    ) -> None:
        super().__init__()
        if len(output_sizes) != len(shard_names):
            raise ValueError(f"{len(output_sizes)} output sizes but shard names {tuple(shard_names)}")
        self.input_size = input_size
        self.output_sizes = tuple(output_sizes)
        self.shard_names = tuple(shard_names)
        self.offsets = tuple(sum(self.output_sizes[:i]) for i in range(len(self.output_sizes)))
        total = sum(self.output_sizes)
        self.weight = nn.Parameter(torch.empty(total, input_size))
        set_weight_loader(self.weight, self.weight_loader, self.shard_names)
        if bias:
            self.bias = nn.Parameter(torch.zeros(total))
            set_weight_loader(self.bias, self.weight_loader, self.shard_names)
        else:
            self.register_parameter("bias", None)

    def _shard_index(self, shard_id: int | str | None) -> int:
        if isinstance(shard_id, int) and 0 <= shard_id < len(self.shard_names):
            return shard_id
        if isinstance(shard_id, str) and shard_id in self.shard_names:
            return self.shard_names.index(shard_id)
        raise ValueError(
            f"{type(self).__name__}: unknown shard_id {shard_id!r}, expected one of {self.shard_names}"
        )

    def weight_loader(
        self,
        param: torch.Tensor,
        loaded_weight: torch.Tensor,
        shard_id: int | str | None = None,
        copy: bool = True,
    ) -> torch.Tensor:
        """Copy one shard into its rows of ``param`` (the packed weight or bias); returns those rows."""
        i = self._shard_index(shard_id)
        target = param.data.narrow(0, self.offsets[i], self.output_sizes[i])
        check_shape(f"{type(self).__name__} shard {self.shard_names[i]!r}", target.shape, loaded_weight)
        if copy:
            target.copy_(loaded_weight)
        return target

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class QKVLinear(MergedLinear):
    """Packed q/k/v projection: shards ``"q"`` (num_heads * head_dim rows), ``"k"`` and ``"v"``
    (num_kv_heads * head_dim rows each)."""

    def __init__(
        self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False
    ) -> None:
        self.q_size, self.kv_size = num_heads * head_dim, num_kv_heads * head_dim
        super().__init__(
            hidden_size, (self.q_size, self.kv_size, self.kv_size), bias, shard_names=("q", "k", "v")
        )
