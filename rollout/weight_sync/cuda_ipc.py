"""CUDA IPC for weight buckets: a trainer on the same GPU shares its bucket buffers by handle.

``share`` turns a CUDA ``uint8`` buffer into plain data (bytes and ints: msgpack-safe, no pickle)
with torch's own CUDA IPC machinery (``UntypedStorage._share_cuda_``, the call behind
``torch.multiprocessing``'s CUDA reduction); ``open_shared`` maps it in the engine process. The
trainer keeps the buffer alive and reuses it across buckets: it fills a buffer only after the engine
acknowledged the copy out of it, and it synchronizes its stream before sending a handle, so the
engine never reads a half-packed bucket.
"""

from __future__ import annotations

from typing import Any

import torch


def device_uuid(device: torch.device) -> str:
    return str(torch.cuda.get_device_properties(device).uuid)


def share(buffer: torch.Tensor) -> dict[str, Any]:
    """Plain-data handle of a contiguous CUDA uint8 ``buffer`` (the whole of it)."""
    if buffer.device.type != "cuda" or buffer.dtype != torch.uint8 or not buffer.is_contiguous():
        raise ValueError(
            f"CUDA IPC shares contiguous CUDA uint8 buffers, got {buffer.dtype} on {buffer.device}"
        )
    storage = buffer.untyped_storage()
    (_, handle, size, offset, ref_handle, ref_offset, event_handle, event_sync) = storage._share_cuda_()
    return {
        "uuid": device_uuid(buffer.device),
        "handle": bytes(handle),
        "storage_bytes": int(size),
        "storage_offset": int(offset),
        "ref_handle": bytes(ref_handle),
        "ref_offset": int(ref_offset),
        "event_handle": bytes(event_handle) if event_handle else b"",
        "event_sync": bool(event_sync),
        "tensor_offset": buffer.storage_offset(),
        "numel": buffer.numel(),
    }


def open_shared(data: dict[str, Any], device: torch.device) -> torch.Tensor:
    """Map a buffer shared by ``share`` (in another process) on ``device``, which must be the same
    physical GPU. ``ValueError`` on malformed data or another GPU."""
    keys = (
        "uuid",
        "handle",
        "storage_bytes",
        "storage_offset",
        "ref_handle",
        "ref_offset",
        "event_handle",
        "event_sync",
        "tensor_offset",
        "numel",
    )
    if not isinstance(data, dict) or any(k not in data for k in keys):
        raise ValueError(f"a CUDA IPC buffer needs the keys {keys}")
    if device.type != "cuda":
        raise ValueError(f"CUDA IPC needs the engine on a GPU, it is on {device}")
    if data["uuid"] != device_uuid(device):
        raise ValueError(
            "CUDA IPC needs the trainer's buffer on the engine's GPU; use a process group across GPUs"
        )
    torch.cuda._lazy_init()
    try:
        storage = torch.UntypedStorage._new_shared_cuda(
            device.index if device.index is not None else torch.cuda.current_device(),
            data["handle"],
            data["storage_bytes"],
            data["storage_offset"],
            data["ref_handle"],
            data["ref_offset"],
            data["event_handle"] or None,
            data["event_sync"],
        )
    except (RuntimeError, TypeError) as e:  # a malformed or stale handle: bad input, not a dead core
        raise ValueError(f"cannot open the shared CUDA buffer: {e}") from None
    flat = torch.empty(0, dtype=torch.uint8, device=device).set_(storage)
    start = int(data["tensor_offset"])
    return flat[start : start + int(data["numel"])]
