"""HF checkpoint names -> model parameters: the one mapping that checkpoint loading, weight sync and
pre-write validation all go through.

A model taking part provides ``named_parameters()`` whose params carry a ``weight_loader`` (and
``shard_ids`` when packed, see ``layers/weight_utils.py``), a ``packed_modules_mapping`` such as
``{"qkv_proj": ["q_proj", "k_proj", "v_proj"]}``, and ``ignored_weight_names()``: suffixes of
checkpoint names to skip.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class WeightTarget:
    """Where one checkpoint tensor goes."""

    param_name: str  # name in model.named_parameters()
    param: nn.Parameter  # the parameter itself (its weight_loader does the copy)
    shard_id: str | None  # shard of a packed parameter, None for a whole parameter


class WeightMapper:
    """Resolves checkpoint names for one model and knows which (parameter, shard) pairs a complete
    set of weights must cover."""

    def __init__(self, model: nn.Module) -> None:
        self.params: dict[str, nn.Parameter] = dict(model.named_parameters())
        self.packed: dict[str, list[str]] = dict(getattr(model, "packed_modules_mapping", {}))
        ignored = model.ignored_weight_names() if hasattr(model, "ignored_weight_names") else ()
        self.ignored: tuple[str, ...] = tuple(ignored)
        self._packed_of = {
            sub: (packed, i) for packed, subs in self.packed.items() for i, sub in enumerate(subs)
        }
        self._resolved: dict[str, WeightTarget | None] = {}  # memo: weight sync resolves the same names
        for name, param in self.params.items():
            shard_ids = getattr(param, "shard_ids", None)
            packed = self._packed_segment(name)
            assert (shard_ids is None) == (packed is None), f"{name}: packed name and shard_ids disagree"
            assert shard_ids is None or len(shard_ids) == len(self.packed[packed]), f"{name}: shard count"

    def _packed_segment(self, param_name: str) -> str | None:
        return next((part for part in param_name.split(".") if part in self.packed), None)

    def _is_ignored(self, name: str) -> bool:
        return any(name == suffix or name.endswith("." + suffix) for suffix in self.ignored)

    def resolve(self, name: str) -> WeightTarget | None:
        """The target of checkpoint tensor ``name``; None if it is to be skipped. Raises
        ``ValueError`` naming it if the model has no such weight."""
        if name in self._resolved:
            return self._resolved[name]
        target = self._resolve(name)
        self._resolved[name] = target
        return target

    def _resolve(self, name: str) -> WeightTarget | None:
        if self._is_ignored(name):
            return None
        parts = name.split(".")
        for j, part in enumerate(parts):
            if part in self._packed_of:
                packed, index = self._packed_of[part]
                param_name = ".".join([*parts[:j], packed, *parts[j + 1 :]])
                param = self.params.get(param_name)
                if param is not None:
                    return WeightTarget(param_name, param, param.shard_ids[index])
                break
        param = self.params.get(name)
        if param is None:
            raise ValueError(f"unexpected weight {name!r}: the model has no such parameter")
        packed = self._packed_segment(name)
        if packed is not None:
            # Packed parameters are only addressable through their HF (unpacked) names.
            raise ValueError(f"unexpected weight {name!r}: load it as {self.packed[packed]} (HF names)")
        return WeightTarget(name, param, None)

    def hf_name(self, param_name: str, shard_id: str | None) -> str:
        """The checkpoint name that provides ``(param_name, shard_id)`` (inverse of ``resolve``)."""
        if shard_id is None:
            return param_name
        packed = self._packed_segment(param_name)
        assert packed is not None
        sub = self.packed[packed][self.params[param_name].shard_ids.index(shard_id)]
        return ".".join(sub if part == packed else part for part in param_name.split("."))

    def required(self) -> set[tuple[str, str | None]]:
        """Every (parameter, shard) pair a complete set of weights must provide."""
        return {
            (name, shard)
            for name, param in self.params.items()
            for shard in (getattr(param, "shard_ids", None) or (None,))
        }


def _apply(
    model: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    write: bool,
    complete: bool = True,
    mapper: WeightMapper | None = None,
    batched: bool = False,
) -> set[str]:
    """``batched``: check every tensor first, then copy them all in one ``_foreach_copy_`` (a few
    kernel launches instead of one per tensor); for tensors already in memory, such as a bucket."""
    mapper = mapper or WeightMapper(model)
    covered: set[tuple[str, str | None]] = set()
    dsts: list[torch.Tensor] = []
    srcs: list[torch.Tensor] = []
    for name, tensor in weights:
        target = mapper.resolve(name)
        if target is None:
            continue
        if not tensor.dtype.is_floating_point:
            raise ValueError(f"weight {name!r} has non-floating dtype {tensor.dtype}")
        # Validation runs the real loader against a meta stand-in of the parameter: same checks,
        # no storage, so nothing can be written (loaders only write through their `param` arg).
        dest = target.param if write else torch.empty_like(target.param, device="meta")
        try:
            view = target.param.weight_loader(dest, tensor, target.shard_id, copy=not batched)
        except ValueError as err:
            raise ValueError(f"weight {name!r} (parameter {target.param_name!r}): {err}") from None
        if batched and write:
            dsts.append(view)
            srcs.append(tensor)
        covered.add((target.param_name, target.shard_id))
    if dsts:
        torch._foreach_copy_(dsts, srcs)
    missing = sorted(mapper.hf_name(*key) for key in mapper.required() - covered) if complete else []
    if missing:
        shown = ", ".join(repr(n) for n in missing[:8]) + (
            f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        )
        raise ValueError(f"missing weights: {shown}")
    return {param_name for param_name, _ in covered}


@torch.no_grad()
def load_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
    """Stream ``(hf_name, tensor)`` pairs into ``model``'s parameters in place (casting dtype, any
    device); returns the parameter names loaded. ``ValueError`` naming the tensor for an unknown
    name, a shape mismatch or a non-floating dtype, and after the stream for missing weights."""
    return _apply(model, weights, write=True)


@torch.no_grad()
def write_weights(
    model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]], mapper: WeightMapper | None = None
) -> set[str]:
    """``load_weights`` without the completeness check: for the pieces of an update whose whole
    manifest already passed ``check_weights`` (weight sync writes bucket by bucket). ``mapper``: a
    ``WeightMapper(model)`` kept across calls (it memoizes name resolution). The tensors are all
    checked, then copied in one batched call."""
    return _apply(model, weights, write=True, complete=False, mapper=mapper, batched=True)


def check_weights(
    model: nn.Module,
    specs: Iterable[tuple[str, tuple[int, ...], torch.dtype]],
    complete: bool = True,
    mapper: WeightMapper | None = None,
) -> set[str]:
    """Validate ``(hf_name, shape, dtype)`` triples as ``load_weights`` would, without writing; with
    ``complete`` every parameter must be covered. Returns the parameter names covered."""
    metas = ((name, torch.empty(tuple(shape), dtype=dtype, device="meta")) for name, shape, dtype in specs)
    return _apply(model, metas, write=False, complete=complete, mapper=mapper)
