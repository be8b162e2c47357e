"""What a weight update carries, before any tensor data moves: the manifest.

A sender flattens its tensors (already cast to the dtype it sends) into fixed-size byte buckets.
The manifest names every tensor, its dtype, shape and place (bucket, byte offset), so the engine
validates the whole update (names, shapes, dtypes, completeness) before the first byte arrives, and
every transport (process group, CUDA IPC) moves plain ``uint8`` buckets. A manifest travels as
msgpack-safe data (``to_wire`` / ``from_wire``): no pickle.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property
from types import MappingProxyType
from typing import Any

import torch

DEFAULT_BUCKET_BYTES = 256 << 20  # big enough to amortize a transfer's fixed cost, small beside a model
ALIGN = 256  # every tensor starts at a multiple of this (any dtype's alignment; coalesced copies)

DTYPES = MappingProxyType(
    {
        "float32": torch.float32,
        "bfloat16": torch.bfloat16,
        "float16": torch.float16,
        "float64": torch.float64,
        "float8_e4m3fn": torch.float8_e4m3fn,
        "float8_e5m2": torch.float8_e5m2,
    }
)


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"weights must have a floating dtype ({', '.join(DTYPES)}), got {name}")
    return name


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of an update."""

    name: str  # HF checkpoint name
    dtype: str  # key of DTYPES: the dtype on the wire
    shape: tuple[int, ...]
    bucket: int  # index of the bucket holding it
    offset: int  # byte offset inside the bucket (a multiple of ALIGN)

    @property
    def nbytes(self) -> int:
        numel = 1
        for d in self.shape:
            numel *= d
        return numel * DTYPES[self.dtype].itemsize


@dataclass(frozen=True)
class Manifest:
    """Every tensor of one update, grouped into buckets sent in order."""

    entries: tuple[TensorEntry, ...]
    bucket_sizes: tuple[int, ...]  # bytes used in each bucket

    @property
    def num_buckets(self) -> int:
        return len(self.bucket_sizes)

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    def bucket_entries(self, bucket: int) -> list[TensorEntry]:
        return list(self._by_bucket[bucket])

    @cached_property
    def _by_bucket(self) -> tuple[tuple[TensorEntry, ...], ...]:
        out: list[list[TensorEntry]] = [[] for _ in self.bucket_sizes]
        for e in self.entries:
            out[e.bucket].append(e)
        return tuple(tuple(b) for b in out)

    def specs(self) -> Iterator[tuple[str, tuple[int, ...], torch.dtype]]:
        """``(name, shape, dtype)`` triples, as ``check_weights`` takes them."""
        for e in self.entries:
            yield e.name, e.shape, DTYPES[e.dtype]

    def to_wire(self) -> dict[str, Any]:
        return {
            "entries": [[e.name, e.dtype, list(e.shape), e.bucket, e.offset] for e in self.entries],
            "bucket_sizes": list(self.bucket_sizes),
        }

    @classmethod
    def from_wire(cls, data: Any) -> Manifest:
        """Parse and check a manifest received from a client. ``ValueError`` on anything malformed:
        the engine must not trust offsets it would write from."""
        if not isinstance(data, dict) or set(data) != {"entries", "bucket_sizes"}:
            raise ValueError("manifest must be a dict with 'entries' and 'bucket_sizes'")
        sizes = data["bucket_sizes"]
        if not isinstance(sizes, list) or not all(isinstance(s, int) and s >= 0 for s in sizes):
            raise ValueError(f"manifest bucket_sizes must be non-negative ints, got {sizes!r:.200}")
        entries = []
        for raw in data["entries"] if isinstance(data["entries"], list) else [None]:
            if not (isinstance(raw, list) and len(raw) == 5):
                raise ValueError(f"malformed manifest entry {raw!r:.200}")
            name, dtype, shape, bucket, offset = raw
            if not isinstance(name, str) or dtype not in DTYPES:
                raise ValueError(f"manifest entry {name!r}: bad name or dtype {dtype!r}")
            if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
                raise ValueError(f"manifest entry {name!r}: bad shape {shape!r}")
            entry = TensorEntry(name, dtype, tuple(shape), bucket, offset)
            if not (isinstance(bucket, int) and 0 <= bucket < len(sizes)):
                raise ValueError(f"manifest entry {name!r}: bucket {bucket!r} out of range")
            if not (isinstance(offset, int) and offset >= 0 and offset % ALIGN == 0):
                raise ValueError(f"manifest entry {name!r}: bad offset {offset!r}")
            if offset + entry.nbytes > sizes[bucket]:
                raise ValueError(f"manifest entry {name!r} overruns bucket {bucket}")
            entries.append(entry)
        names = [e.name for e in entries]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ValueError(f"manifest names weight {dup!r} twice")
        return cls(tuple(entries), tuple(sizes))


def plan_buckets(
    specs: Iterable[tuple[str, tuple[int, ...], torch.dtype]], bucket_bytes: int = DEFAULT_BUCKET_BYTES
) -> Manifest:
    """Lay tensors out in order into buckets of at most ``bucket_bytes``; a tensor larger than that
    gets a bucket of its own size."""
    if bucket_bytes < ALIGN:
        raise ValueError(f"bucket_bytes must be at least {ALIGN}, got {bucket_bytes}")
    entries: list[TensorEntry] = []
    sizes: list[int] = []
    for name, shape, dtype in specs:
        entry = TensorEntry(name, dtype_name(dtype), tuple(int(d) for d in shape), 0, 0)
        start = -(-sizes[-1] // ALIGN) * ALIGN if sizes else 0
        if not sizes or start + entry.nbytes > bucket_bytes:
            sizes.append(0)
            start = 0
        entries.append(TensorEntry(entry.name, entry.dtype, entry.shape, len(sizes) - 1, start))
        sizes[-1] = start + entry.nbytes
    return Manifest(tuple(entries), tuple(sizes))


def pack(tensors: Iterable[torch.Tensor], entries: list[TensorEntry], buffer: torch.Tensor) -> None:
    """Copy (and cast) ``tensors`` into ``buffer`` (uint8) at their entries' offsets, in one batched
    copy (a few kernel launches for the whole bucket, not one per tensor)."""
    views = [view for _, view in unpack(buffer, entries)]
    srcs = [tensor.detach() for tensor in tensors]
    if len(srcs) != len(views):
        raise ValueError(f"{len(srcs)} tensors for {len(views)} manifest entries")
    for src, dst, e in zip(srcs, views, entries, strict=True):
        if src.shape != dst.shape:
            raise ValueError(f"weight {e.name!r}: shape {tuple(src.shape)} != manifest {e.shape}")
    if views:
        torch._foreach_copy_(views, srcs, non_blocking=True)


def unpack(buffer: torch.Tensor, entries: list[TensorEntry]) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, view)`` pairs into ``buffer`` (uint8) for ``entries``; views, no copies."""
    for e in entries:
        yield e.name, buffer[e.offset : e.offset + e.nbytes].view(DTYPES[e.dtype]).view(e.shape)
