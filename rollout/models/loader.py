"""Build a model and fill its weights: from safetensors (single or sharded) or random (dummy)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from types import MappingProxyType

import torch
from safetensors import safe_open
from torch import nn

from rollout.models.config import ModelConfig
from rollout.models.layers.norm import RMSNorm
from rollout.models.registry import get_model_class

LOAD_FORMATS = ("auto", "safetensors", "dummy")

# safetensors header dtype codes; integer ones are listed so check_weights can reject them by name.
_ST_DTYPES = MappingProxyType(
    {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "F8_E4M3": torch.float8_e4m3fn,
        "F8_E5M2": torch.float8_e5m2,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U8": torch.uint8,
        "BOOL": torch.bool,
    }
)


def safetensors_files(path: str | Path) -> list[Path]:
    """The checkpoint's files: the shards named by ``model.safetensors.index.json`` (each must
    exist), else ``model.safetensors``. ``FileNotFoundError`` saying what is missing."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {str(path)!r} does not exist")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(_weight_map(index).values()))
        missing = [name for name in shards if not (path / name).is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists shards that do not exist: {missing}")
        return [path / name for name in shards]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {str(path)!r}")


def _weight_map(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"{index} is not a safetensors index: {e}") from None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise ValueError(f"{index} has no 'weight_map' of tensor names to shard files")
    return weight_map


def read_weight_specs(files: list[Path]) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """``(name, shape, dtype)`` of every tensor, from the headers only (no tensor data is read). A
    sharded checkpoint's headers must hold exactly the tensors its index names, each in its shard."""
    specs = []
    where: dict[str, str] = {}
    for file in files:
        try:
            handle_cm = safe_open(str(file), framework="pt")
        except Exception as e:  # safetensors' own error type, not a ValueError: a truncated file
            raise ValueError(f"weight file {file} cannot be read: {e}") from None
        with handle_cm as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open handles are not iterable)
                if name in where:
                    raise ValueError(f"weight {name!r} is in both {where[name]} and {file.name}")
                where[name] = file.name
                tensor_slice = handle.get_slice(name)
                code = tensor_slice.get_dtype()
                if code not in _ST_DTYPES:
                    raise ValueError(f"weight {name!r} in {file.name} has unsupported dtype {code}")
                specs.append((name, tuple(tensor_slice.get_shape()), _ST_DTYPES[code]))
    index = files[0].parent / "model.safetensors.index.json" if files else None
    if index is not None and index.is_file():
        weight_map = _weight_map(index)
        wrong = sorted(
            {n for n, f in weight_map.items() if where.get(n) != f} | (where.keys() - weight_map.keys())
        )
        if wrong:
            raise ValueError(f"{index} names tensors its shards do not hold as listed: {wrong[:5]}")
    return specs


def iter_weights(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream ``(name, cpu tensor)`` pairs one at a time, file by file."""
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open handles are not iterable)
                yield name, handle.get_tensor(name)


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int = 0) -> None:
    """Random weights for benchmarks: uniform(-0.02, 0.02) from a seeded generator, norm weights 1."""
    norm_params = {id(p) for m in model.modules() if isinstance(m, RMSNorm) for p in m.parameters()}
    generators: dict[torch.device, torch.Generator] = {}
    for param in model.parameters():
        if id(param) in norm_params:
            param.fill_(1.0)
            continue
        if param.device not in generators:
            generators[param.device] = torch.Generator(device=param.device).manual_seed(seed)
        param.uniform_(-0.02, 0.02, generator=generators[param.device])


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    # Constructing in the target dtype avoids a transient fp32 copy of the whole model.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def load_model(
    model_config: ModelConfig, device: str | torch.device, load_format: str = "auto", seed: int = 0
) -> nn.Module:
    """Build ``model_config``'s model on ``device`` in ``model_config.dtype`` and fill its weights;
    returned in eval mode. ``"auto"``/``"safetensors"`` read ``model_config.path`` (every header is
    validated with ``check_weights`` before the first tensor is read); ``"dummy"`` needs only the
    config and draws seeded random weights."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"unknown load_format {load_format!r}; expected one of {LOAD_FORMATS}")
    device = torch.device(device)
    cls = get_model_class(model_config.architecture)
    files = [] if load_format == "dummy" else safetensors_files(model_config.path)
    with torch.device(device), _default_dtype(model_config.dtype):
        model = cls(model_config.hf_config)
    model.to(device=device, dtype=model_config.dtype)  # also casts buffers (the rotary table)
    if load_format == "dummy":
        init_dummy_weights(model, seed)
    else:
        model.check_weights(read_weight_specs(files))
        model.load_weights(iter_weights(files))
    return model.eval()
