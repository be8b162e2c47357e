"""Per-parameter weight loaders: how one checkpoint tensor lands in (a slice of) one parameter.

Contract of a ``weight_loader(param, loaded_weight, shard_id=None, copy=True)``:
- it writes ONLY through its ``param`` argument (never through ``self.weight`` of the owning
  module), so ``check_weights`` can run the very same loader against meta tensors to validate a
  whole update without writing a byte;
- it checks the exact shape before copying (``copy_`` alone would broadcast) and raises
  ``ValueError`` describing the mismatch;
- it copies in place (``param.data[...].copy_``), casting dtype, so the parameter's storage and
  any CUDA graph captured over it stay valid;
- it returns the destination (the view of ``param.data`` it fills); with ``copy=False`` it only
  checks and returns it, so a caller can copy many tensors in one batched call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

WeightLoader = Callable[..., torch.Tensor]


def set_weight_loader(
    param: torch.Tensor, loader: WeightLoader, shard_ids: Sequence[str] | None = None
) -> None:
    """Attach ``loader`` to ``param``; ``shard_ids`` names the shards of a packed parameter (in
    packing order), each of which a checkpoint must provide once."""
    param.weight_loader = loader  # type: ignore[attr-defined]
    param.shard_ids = tuple(shard_ids) if shard_ids is not None else None  # type: ignore[attr-defined]


def check_shape(what: str, expected: torch.Size | Sequence[int], loaded: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``loaded`` has exactly the shape ``expected``."""
    if tuple(expected) != tuple(loaded.shape):
        raise ValueError(f"shape mismatch for {what}: expected {tuple(expected)}, got {tuple(loaded.shape)}")


def default_weight_loader(
    param: torch.Tensor, loaded_weight: torch.Tensor, shard_id: int | str | None = None, copy: bool = True
) -> torch.Tensor:
    """Whole-parameter copy (unpacked parameters)."""
    if shard_id is not None:
        raise ValueError(f"unpacked parameter of shape {tuple(param.shape)} got shard_id={shard_id!r}")
    check_shape("parameter", param.shape, loaded_weight)
    if copy:
        param.data.copy_(loaded_weight)
    return param.data
