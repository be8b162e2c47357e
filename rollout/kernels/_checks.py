"""Argument checks shared by the Triton attention launchers (cheap, host-side, no device sync)."""

from __future__ import annotations

import functools
import numbers

import torch
import triton

KV_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
HEAD_DIMS = (16, 32, 64, 128, 256)


def check_kv_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, int, int, int]:
    """Validate a paged cache pair; returns (num_blocks, block_size, num_kv_heads, head_dim)."""
    if k_cache.dim() != 4:
        raise ValueError(f"k_cache must be [num_blocks, block_size, kv_heads, head_dim], got {k_cache.shape}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache shape {tuple(v_cache.shape)} != k_cache shape {tuple(k_cache.shape)}")
    if k_cache.dtype not in KV_DTYPES or v_cache.dtype != k_cache.dtype:
        raise ValueError(
            f"cache dtypes must match and be one of {KV_DTYPES}, got {k_cache.dtype}/{v_cache.dtype}"
        )
    if k_cache.device != v_cache.device:
        raise ValueError(f"caches on different devices: {k_cache.device} / {v_cache.device}")
    num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
    if block_size <= 0 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two, got {block_size}")
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {HEAD_DIMS}, got {head_dim}")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.stride(3) != 1:
            raise ValueError(f"{name} must be contiguous in head_dim, got strides {cache.stride()}")
    return num_blocks, block_size, num_kv_heads, head_dim


def check_query(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, int, int]:
    """Attention queries ``q`` [rows, Hq, D] against a paged cache pair (Hq a multiple of the KV
    heads, the cache's dtype and device); returns (block_size, num_kv_heads, head_dim)."""
    _, block_size, num_kv_heads, head_dim = check_kv_cache(k_cache, v_cache)
    check_rows("q", q, None, head_dim, k_cache.device)
    if q.dtype != k_cache.dtype:
        raise ValueError(f"q dtype {q.dtype} != cache dtype {k_cache.dtype}")
    if q.shape[1] % num_kv_heads:
        raise ValueError(f"q has {q.shape[1]} heads, not a multiple of {num_kv_heads} KV heads")
    return block_size, num_kv_heads, head_dim


def output_like(q: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """An attention launch's output: ``out`` checked to be ``q``'s shape, dtype and device with a
    unit inner stride, or a new tensor when None."""
    if out is None:
        return torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or out.stride(2) != 1:
        raise ValueError(
            f"out must be {tuple(q.shape)} {q.dtype} on {q.device} with unit inner stride, got "
            f"{tuple(out.shape)} {out.dtype} on {out.device} strides {out.stride()}"
        )
    return out


def check_rows(
    name: str, x: torch.Tensor, num_heads: int | None, head_dim: int, device: torch.device
) -> None:
    """A [rows, heads, head_dim] activation with a unit stride along head_dim."""
    if x.dim() != 3 or x.shape[2] != head_dim or (num_heads is not None and x.shape[1] != num_heads):
        want = f"[rows, {num_heads if num_heads is not None else 'heads'}, {head_dim}]"
        raise ValueError(f"{name} must be {want}, got {tuple(x.shape)}")
    if x.stride(2) != 1:
        raise ValueError(f"{name} must be contiguous in head_dim, got strides {x.stride()}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device}, the cache on {device}")


def check_index(name: str, x: torch.Tensor, shape: tuple[int, ...], device: torch.device) -> None:
    """An int32 index tensor of exactly ``shape`` (-1 entries mean 'any size' in that dim)."""
    if x.dtype != torch.int32:
        raise ValueError(f"{name} must be int32, got {x.dtype}")
    if x.dim() != len(shape) or any(w not in (-1, g) for g, w in zip(x.shape, shape, strict=True)):
        raise ValueError(f"{name} must have shape {shape} (-1: any), got {tuple(x.shape)}")
    if x.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dim, got strides {x.stride()}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device}, the cache on {device}")


def check_slots(slot_mapping: torch.Tensor, num_tokens: int, device: torch.device) -> None:
    """One flat cache slot per row (``block * block_size + offset``; -1: a padding row, skipped):
    a contiguous int32/int64 [num_tokens] tensor, since the kernels read row t's slot at t."""
    if (
        slot_mapping.shape != (num_tokens,)
        or slot_mapping.device != device
        or slot_mapping.dtype not in (torch.int32, torch.int64)
        or (num_tokens > 1 and slot_mapping.stride(0) != 1)
    ):
        raise ValueError(
            f"slot_mapping must be contiguous int32/int64 [{num_tokens}] on {device}, got "
            f"{tuple(slot_mapping.shape)} {slot_mapping.dtype} on {slot_mapping.device} strides "
            f"{slot_mapping.stride()}"
        )


def check_window(sliding_window: int | None) -> None:
    if sliding_window is None:
        return
    # a float or bool would reach the kernel as an fp32 / i1 scalar: an opaque Triton type error
    if (
        isinstance(sliding_window, bool)
        or not isinstance(sliding_window, numbers.Integral)
        or sliding_window <= 0
    ):
        raise ValueError(f"sliding_window must be a positive int or None, got {sliding_window!r}")


@functools.cache
def _major_capability(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def pdl_supported(device: torch.device) -> bool:
    """Programmatic dependent launch (``griddepcontrol``) exists on ``device``: CUDA, compute
    capability 9.0 (Hopper) or later."""
    if device.type != "cuda":
        return False
    return _major_capability(device.index if device.index is not None else torch.cuda.current_device()) >= 9


def pdl_usable(kernel: object, device: torch.device) -> bool:
    """``kernel`` (a ``@triton.jit`` function) may use ``griddepcontrol`` on ``device``: it is
    compiled (the interpreter, ``TRITON_INTERPRET=1``, lacks the instruction) and the device has
    it (``pdl_supported``)."""
    return isinstance(kernel, triton.runtime.JITFunction) and pdl_supported(device)
