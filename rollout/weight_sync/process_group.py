"""A process group of its own between trainer rank(s) and engine worker(s), and the bucket stream
over it.

The group is built from a ``TCPStore`` that the sender (rank 0) hosts on any free port, never from
the trainer's default group, so a trainer may open as many as it has engines. ``nccl`` moves GPU
buckets, ``gloo`` CPU buckets, through the same code. Rank 0 broadcasts each bucket of a
``Manifest``; every other rank receives it. Both sides keep two buffers, so bucket ``i + 1`` moves
while bucket ``i`` is packed (sender) or copied into the weights (engine).
"""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist

from rollout.weight_sync.manifest import Manifest, TensorEntry, pack

BACKENDS = ("gloo", "nccl")


class WeightGroup:
    """One member of a weight-sync group."""

    def __init__(
        self,
        host: str,
        port: int,
        rank: int,
        world_size: int,
        backend: str,
        device: torch.device,
        timeout_s: float = 600.0,
        store: dist.TCPStore | None = None,
    ) -> None:
        """Join (rank > 0) or host (rank 0, ``store`` made by ``host_store``) the group; blocks until
        every rank joined. ``device``: where buckets live (a GPU for nccl, the CPU for gloo)."""
        self.check(rank, world_size, backend, device, timeout_s)
        timeout = datetime.timedelta(seconds=timeout_s)
        if store is None:
            store = dist.TCPStore(host, port, world_size, rank == 0, timeout=timeout)
        self.store = store
        self.rank, self.world_size, self.backend, self.device = rank, world_size, backend, device
        prefixed = dist.PrefixStore("rollout-weights", store)
        if backend == "nccl":
            torch.cuda.set_device(device)
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            self.pg: dist.ProcessGroup = dist.ProcessGroupNCCL(prefixed, rank, world_size, options)
        else:
            self.pg = dist.ProcessGroupGloo(prefixed, rank, world_size, timeout)
        # One tiny collective proves the group works (NCCL connects lazily otherwise).
        probe = torch.zeros(1, device=device)
        self._broadcast(probe).wait()
        self._buffers: list[torch.Tensor] = []

    @staticmethod
    def check(rank: int, world_size: int, backend: str, device: torch.device, timeout_s: float) -> None:
        """ValueError unless a member with these arguments can be built (nothing connects)."""
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if not (isinstance(world_size, int) and world_size >= 2 and isinstance(rank, int)):
            raise ValueError(f"need world_size >= 2 and an int rank, got {world_size!r}, {rank!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a group of {world_size}")
        if (backend == "nccl") != (device.type == "cuda"):
            raise ValueError(f"backend {backend!r} cannot move buckets on {device}")
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float) or not 0 < timeout_s <= 1e9:
            # (timedelta raises OverflowError past ~8.6e13 s: not a ValueError, it killed the engine core)
            raise ValueError(f"timeout_s must be a number of seconds in (0, 1e9], got {timeout_s!r}")

    @staticmethod
    def host_store(host: str = "127.0.0.1", port: int = 0, world_size: int = 2, timeout_s: float = 600.0):
        """Rank 0's store on ``port`` (0: any free port; read it back from ``store.port``)."""
        return dist.TCPStore(
            host,
            port,
            world_size,
            True,
            timeout=datetime.timedelta(seconds=timeout_s),
            wait_for_workers=False,
        )

    def _broadcast(self, tensor: torch.Tensor) -> dist.Work:
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        opts.rootTensor = 0
        return self.pg.broadcast([tensor], opts)

    def _buffer(self, i: int, nbytes: int) -> torch.Tensor:
        """The i-th (0/1) reusable bucket buffer, grown as needed."""
        while len(self._buffers) <= i:
            self._buffers.append(torch.empty(0, dtype=torch.uint8, device=self.device))
        if self._buffers[i].numel() < nbytes:
            self._buffers[i] = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        return self._buffers[i][:nbytes]

    def send(self, manifest: Manifest, tensors: Iterator[torch.Tensor]) -> None:
        """Rank 0: pack ``tensors`` (in manifest order) bucket by bucket and broadcast them."""
        assert self.rank == 0
        pending: list[dist.Work | None] = [None, None]
        for b in range(manifest.num_buckets):
            slot = b % 2
            if pending[slot] is not None:
                pending[slot].wait()  # the buffer is free again once its broadcast is done
            buf = self._buffer(slot, manifest.bucket_sizes[b])
            entries = manifest.bucket_entries(b)
            pack((next(tensors) for _ in entries), entries, buf)
            pending[slot] = self._broadcast(buf)
        for work in pending:
            if work is not None:
                work.wait()
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def receive(self, manifest: Manifest, consume: Callable[[torch.Tensor, list[TensorEntry]], None]) -> None:
        """Other ranks: receive every bucket; ``consume(buffer, entries)`` copies one out (it runs
        while the next bucket is already in flight)."""
        assert self.rank != 0
        n = manifest.num_buckets
        works: list[dist.Work | None] = [None, None]
        bufs: list[torch.Tensor | None] = [None, None]

        def start(b: int) -> None:
            bufs[b % 2] = self._buffer(b % 2, manifest.bucket_sizes[b])
            works[b % 2] = self._broadcast(bufs[b % 2])

        if n:
            start(0)
        for b in range(n):
            works[b % 2].wait()
            if b + 1 < n:
                start(b + 1)  # NCCL orders it after the copies already queued on this stream
            consume(bufs[b % 2], manifest.bucket_entries(b))  # gloo fills the other buffer meanwhile
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def close(self) -> None:
        """Leave the group (idempotent)."""
        pg = self.__dict__.pop("pg", None)
        if pg is not None and self.backend == "nccl":
            with contextlib.suppress(Exception):
                pg.shutdown()
        self._buffers.clear()
