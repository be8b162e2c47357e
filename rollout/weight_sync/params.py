"""The trainer's full weights, whatever wraps the model: plain ``nn.Module`` / HF models, DDP and
accelerate wrappers, ``torch.compile``, FSDP2 (``fully_shard``: DTensor parameters) and FSDP1.

``full_weights(model)`` yields ``FullWeight`` items with the HF name, the full (global) shape and
dtype known up front, and a ``get()`` that materializes one full tensor. For sharded parameters
``get()`` is a collective (an all-gather over the FSDP group): every rank calls it, in the same
order, one parameter at a time, so only one full parameter exists at once. Only rank 0 sends what
it gathered; the other ranks drop it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class FullWeight:
    name: str  # HF checkpoint name
    shape: tuple[int, ...]  # full shape
    dtype: torch.dtype
    get: Callable[[], torch.Tensor]  # the full tensor (a collective for sharded parameters)
    sharded: bool = False  # get() is a collective


def unwrap(model: nn.Module) -> nn.Module:
    """Strip DDP / DataParallel / accelerate and ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


@contextlib.contextmanager
def full_weights(
    source: nn.Module | Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
) -> Iterator[list[FullWeight]]:
    """The full weights of a model (see the module doc), of a state dict or of ``(name, tensor)`` pairs."""
    if isinstance(source, Mapping):
        source = list(source.items())
    if not isinstance(source, nn.Module):
        items = []
        for pair in source:
            if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[1], torch.Tensor)):
                raise TypeError(f"weights must be (name, tensor) pairs, got {type(pair).__name__}")
            items.append(_weight(*pair))
        yield items
        return
    model = unwrap(source)
    fsdp1 = _fsdp1_class()
    if fsdp1 is not None and any(isinstance(m, fsdp1) for m in model.modules()):
        # FSDP1 flattens parameters; summoning restores the original ones (the whole model at once).
        # The root need not be wrapped itself (only its layers may be): summon from the root anyway.
        with fsdp1.summon_full_params(model, writeback=False, recurse=True):
            yield [_weight(_clean(n), p) for n, p in model.named_parameters()]
        return
    yield [_weight(_clean(n), p) for n, p in model.named_parameters()]


def check_dense(name: str, tensor: torch.Tensor) -> None:
    """ValueError for a tensor that holds no dense data (meta, sparse): refused before anything is
    written or sent, since copying it would fail after earlier weights were written, leaving a mix
    of old and new weights."""
    if tensor.layout != torch.strided or tensor.is_meta:
        raise ValueError(
            f"weight {name!r}: needs a dense tensor holding data, got {tensor.layout} on {tensor.device}"
        )


def _weight(name: str, tensor: torch.Tensor) -> FullWeight:
    tensor = tensor.detach()
    check_dense(name, tensor)  # before the manifest goes out
    if _is_dtensor(tensor):
        return FullWeight(name, tuple(tensor.shape), tensor.dtype, tensor.full_tensor, sharded=True)
    return FullWeight(name, tuple(tensor.shape), tensor.dtype, lambda: tensor)


def _is_dtensor(tensor: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without distributed
        return False
    return isinstance(tensor, DTensor)


def _fsdp1_class() -> type | None:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:
        return None
    return FullyShardedDataParallel


def _clean(name: str) -> str:
    """HF names from wrapped module paths (FSDP1, activation checkpointing, compile)."""
    for part in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(part, "")
    return name
