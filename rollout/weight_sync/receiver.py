"""The engine side of weight sync: validate a whole update, then write it in place.

Every source goes through the model's own ``check_weights`` (names, shapes, dtypes, completeness)
before the first write, and through the same per-parameter ``weight_loader``s as checkpoint loading
(packed qkv / gate_up, tied embeddings, dtype cast) when writing: they check each tensor of a
bucket and name its destination, then the bucket is copied in one batched call. Writes go into the
existing parameter storage, so CUDA graphs stay valid.

A failure after the first write (a sender that died mid-stream, a broken transport) leaves a mix of
old and new weights: ``dirty`` records it, and the engine serves nothing until a complete update
arrives (``EngineCore.weights_valid``).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rollout.models.loader import iter_weights, read_weight_specs, safetensors_files
from rollout.models.weights import WeightMapper, check_weights, write_weights
from rollout.weight_sync import cuda_ipc
from rollout.weight_sync.manifest import Manifest, TensorEntry, unpack
from rollout.weight_sync.params import check_dense
from rollout.weight_sync.process_group import WeightGroup


class WeightReceiver:
    """Applies updates to one model on one device."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.model = model
        self.device = device
        self.group: WeightGroup | None = None
        self.dirty = False  # some weights were written by an update that did not complete
        self._session: _Session | None = None
        self._mapper = WeightMapper(model)  # parameters keep their identity across sleep/wake
        # Spec lists that passed validation: an RL loop sends the same names, shapes and dtypes every
        # step, and the verdict depends on nothing else, so it is computed once.
        self._valid_specs: dict[tuple, None] = {}

    # ---- in memory and on disk ----------------------------------------------------------------
    def apply_tensors(self, weights: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Same-process update from ``(hf_name, tensor)`` pairs (any device, any float dtype);
        returns the bytes received."""
        items = list(weights)
        for item in items:
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], torch.Tensor)):
                raise TypeError(f"weights must be (name, tensor) pairs, got {type(item).__name__}")
            if not isinstance(item[0], str):
                raise TypeError(f"weight names must be str, got {item[0]!r}")
            check_dense(*item)
        self._check([(n, tuple(t.shape), t.dtype) for n, t in items])
        self._write(items)
        return sum(t.numel() * t.element_size() for _, t in items)

    def apply_disk(self, path: str) -> int:
        """Reload from a safetensors directory (single or sharded); every header is checked first."""
        files = self.check_disk(path)
        self._write(iter_weights(files))
        return sum(f.stat().st_size for f in files)

    def check_disk(self, path: str) -> list[Path]:
        """Validate a safetensors directory's headers as ``apply_disk`` would; returns its files."""
        try:
            if not isinstance(path, str) or not Path(path).is_dir():
                raise ValueError(f"weight directory {path!r} does not exist")
            files = safetensors_files(path)
            specs = read_weight_specs(files)
        except OSError as e:  # also a name too long, a directory we may not read: bad input
            raise ValueError(f"weight directory {path!r:.300}: {e.strerror or e}") from None
        self._check(specs)
        return files

    # ---- process group ------------------------------------------------------------------------
    def init_group(
        self,
        host: str,
        port: int,
        rank: int,
        world_size: int,
        backend: str,
        timeout_s: float,
        check_only: bool = False,
    ) -> None:
        """Join the sender's group; with ``check_only``, only check that it could (ValueError if not)."""
        if self.group is not None:
            raise ValueError("a weight group is already open; destroy_weight_group() first")
        if not isinstance(host, str) or not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError(f"bad weight group address {host!r}:{port!r}")
        if rank == 0:
            raise ValueError("rank 0 is the sender's; an engine joins with rank >= 1")
        device = self.device if backend == "nccl" else torch.device("cpu")
        WeightGroup.check(rank, world_size, backend, device, timeout_s)
        if not check_only:
            self.group = WeightGroup(host, port, rank, world_size, backend, device, timeout_s)

    def destroy_group(self) -> bool:
        if self.group is None:
            return False
        self.group.close()
        self.group = None
        return True

    # ---- bucketed updates (process group or CUDA IPC) ---------------------------------------
    def check_manifest(self, manifest: Manifest) -> None:
        """Validate a bucketed update's names, shapes and dtypes (as ``begin`` does)."""
        self._check(list(manifest.specs()))

    def begin(self, manifest: Manifest, buffers: list[dict[str, Any]] | None = None) -> None:
        """Validate a whole bucketed update before any data moves. Without ``buffers`` the buckets
        come over the weight group (``receive_group``), with them over CUDA IPC (``copy_bucket``)."""
        if self._session is not None:
            raise ValueError("a weight update is already in progress")
        self.check_manifest(manifest)
        if buffers is None:
            if self.group is None:
                raise ValueError("no weight group: init_weight_group() first")
            self._session = _Session(manifest, None)
            return
        if not isinstance(buffers, list) or not buffers:
            raise ValueError("a CUDA IPC update needs at least one shared buffer")
        views = [cuda_ipc.open_shared(b, self.device) for b in buffers]
        for b in range(manifest.num_buckets):
            if manifest.bucket_sizes[b] > views[b % len(views)].numel():
                raise ValueError(f"bucket {b} ({manifest.bucket_sizes[b]} bytes) exceeds its shared buffer")
        self._session = _Session(manifest, views)

    @property
    def in_progress(self) -> bool:
        return self._session is not None

    def receive_group(self) -> None:
        """Receive every bucket of the open update from rank 0, writing each as it lands."""
        s = self._require(ipc=False)
        assert self.group is not None
        self.group.receive(s.manifest, self._write_bucket_counted)

    def copy_bucket(self, index: int) -> None:
        """CUDA IPC: copy bucket ``index`` out of its shared buffer; returns once the copy is done (the
        trainer may then refill that buffer)."""
        s = self._require(ipc=True)
        if index != s.next_bucket:
            raise ValueError(f"expected bucket {s.next_bucket}, got {index!r}")
        assert s.buffers is not None
        buf = s.buffers[index % len(s.buffers)][: s.manifest.bucket_sizes[index]]
        self._write_bucket_counted(buf, s.manifest.bucket_entries(index))
        torch.cuda.current_stream(self.device).synchronize()

    def end(self, complete: bool) -> int:
        """Close the open update; with ``complete``, check that every bucket arrived (``ValueError``
        if not). Returns the bytes moved."""
        s, self._session = self._session, None
        if s is None:
            raise ValueError("no weight update in progress")
        if complete and s.next_bucket != s.manifest.num_buckets:
            raise ValueError(f"the update ended after {s.next_bucket} of {s.manifest.num_buckets} buckets")
        return s.manifest.total_bytes

    def _require(self, ipc: bool) -> _Session:
        s = self._session
        if s is None:
            raise ValueError("no weight update in progress: begin_weight_update() first")
        if (s.buffers is not None) != ipc:
            raise ValueError(
                f"the update in progress moves buckets over {'CUDA IPC' if s.buffers else 'the group'}"
            )
        return s

    def _write_bucket_counted(self, buf: torch.Tensor, entries: list[TensorEntry]) -> None:
        assert self._session is not None
        self._write(unpack(buf, entries))
        self._session.next_bucket += 1

    # ---- writing ------------------------------------------------------------------------------
    def _write(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Write validated weights; marks ``dirty`` until the caller reports completion."""
        self.dirty = True
        write_weights(self.model, weights, self._mapper)

    def _check(self, specs: list[tuple[str, tuple[int, ...], torch.dtype]]) -> None:
        """Validate a whole update's ``(name, shape, dtype)`` list (memoized; see ``__init__``)."""
        key = tuple((n, tuple(s), d) for n, s, d in specs)
        if key in self._valid_specs:
            return
        _check_unique(n for n, _, _ in specs)
        check_weights(self.model, specs, mapper=self._mapper)
        if len(self._valid_specs) >= 8:
            self._valid_specs.pop(next(iter(self._valid_specs)))
        self._valid_specs[key] = None

    def mark_complete(self) -> None:
        self.dirty = False


class _Session:
    """An update between ``begin`` and ``end``."""

    def __init__(self, manifest: Manifest, buffers: list[torch.Tensor] | None) -> None:
        self.manifest = manifest
        self.buffers = buffers  # CUDA IPC views, or None for the weight group
        self.next_bucket = 0  # buckets written so far


def _check_unique(names: Iterable[str]) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"the update names weight {name!r} twice")
        seen.add(name)
