"""The trainer side: ``WeightSender(llm).push(model, version=...)``.

One call sends the model's full weights to an engine, by the cheapest way that reaches it:

- ``direct``: the engine lives in this process (``LLM(...)``): tensors are copied straight in;
- ``cuda_ipc``: the engine process is on this GPU: two bucket buffers shared by handle;
- ``nccl``: the engine is on another GPU: a process group of our own (rank 0 = this sender);
- ``gloo``: CPU engines (and CPU trainers): the same group over gloo.

The engine is an ``LLM`` (in this process or in its own) or any ``EngineControl``, a control channel
to an engine elsewhere: ``HTTPRolloutClient`` drives a served engine through its /admin routes.

``auto`` picks in that order. Every bucketed push first sends the manifest (names, shapes, dtypes):
the engine validates the whole update before any byte moves, so a bad update raises ``ValueError``
here and leaves the old weights serving. Floating tensors are cast to the engine's dtype on the way
into the buckets (fp32 masters go out as bf16). With a sharded trainer (FSDP), call ``push`` on
every rank: all ranks join each parameter's gather, rank 0 (the one built with the ``llm``) sends.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from rollout.weight_sync import cuda_ipc
from rollout.weight_sync.manifest import DEFAULT_BUCKET_BYTES, DTYPES, Manifest, pack, plan_buckets
from rollout.weight_sync.params import FullWeight, full_weights
from rollout.weight_sync.process_group import WeightGroup

if TYPE_CHECKING:
    from rollout.client import EngineInfo
    from rollout.llm import LLM

TRANSPORTS = ("auto", "direct", "cuda_ipc", "nccl", "gloo")
# a model, a state dict, or (hf_name, tensor) pairs
Weights = nn.Module | Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]


class EngineControl(Protocol):
    """The control calls of an engine in another process, as a bucketed push makes them
    (``EngineCoreClient`` is one; ``HTTPRolloutClient`` another, over the server's /admin routes).
    ``start_call`` must return at once: the sender broadcasts while the engine's call is running."""

    @property
    def info(self) -> EngineInfo:  # ``device``, ``dtype``, ``device_uuid``: the transport and wire dtype
        ...

    def call(self, method: str, timeout_s: float = 600.0, **args: Any) -> Any: ...

    def start_call(self, method: str, **args: Any) -> int: ...

    def wait_call(self, call_id: int, method: str = "call", timeout_s: float = 600.0) -> Any: ...


class WeightSender:
    """Pushes a trainer's weights into one engine; reusable across steps (keeps its group open)."""

    def __init__(
        self,
        llm: LLM | EngineControl | None,
        *,
        transport: str = "auto",
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        host: str = "127.0.0.1",
        timeout_s: float = 600.0,
    ) -> None:
        """``llm``: the engine (an ``LLM``, in this process or not, or an ``EngineControl``); None on
        trainer ranks that only join the gathers. ``host``: the address the engine reaches this process
        on (process groups)."""
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
        self.llm = llm
        self.transport = transport
        self.bucket_bytes = bucket_bytes
        self.host = host
        self.timeout_s = timeout_s
        self.group: WeightGroup | None = None
        self._ipc_buffers: list[torch.Tensor] = []
        self.last_transport: str | None = None  # what the last push used

    # ---- public -------------------------------------------------------------------------------
    def push(self, model: Weights, version: int | None = None, pause: str = "keep") -> int | None:
        """Send ``model``'s full weights (an ``nn.Module`` or ``(hf_name, tensor)`` pairs). ``pause``:
        what the engine does with requests in flight ("keep": they continue on the new weights,
        "abort", "wait"). Returns the engine's new weight version (None on non-sending ranks)."""
        with full_weights(model) as weights:
            if self.llm is None:
                for w in weights:
                    w.get()  # join the collective gathers; rank 0 sends
                return None
            transport = self._pick(weights)
            self.last_transport = transport
            if transport == "direct":
                engine = getattr(self.llm, "engine", None)
                assert engine is not None
                return engine.update_weights([(w.name, w.get()) for w in weights], version)
            manifest = plan_buckets(
                ((w.name, w.shape, self._wire_dtype(w.dtype)) for w in weights), self.bucket_bytes
            )
            if transport == "cuda_ipc":
                return self._push_ipc(manifest, weights, version, pause)
            return self._push_group(transport, manifest, weights, version, pause)

    def close(self) -> None:
        """Leave the weight group (the engine leaves too) and free the buffers; idempotent."""
        if self.group is not None:
            client = self._client()
            with contextlib.suppress(Exception):
                client.call("destroy_weight_group", timeout_s=30.0)
            self.group.close()
            self.group = None
        self._ipc_buffers.clear()

    def __enter__(self) -> WeightSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- transports ---------------------------------------------------------------------------
    def _pick(self, weights: list[FullWeight]) -> str:
        llm = self.llm
        assert llm is not None
        if getattr(llm, "engine", None) is not None:
            if self.transport not in ("auto", "direct"):
                raise ValueError(
                    f"the engine is in this process: transport {self.transport!r} does not apply"
                )
            return "direct"
        if self.transport == "direct":
            raise ValueError("transport 'direct' needs the engine in this process (LLM(multiprocess=False))")
        if self.transport != "auto":
            return self.transport
        info = self._client().info
        if not info.device.startswith("cuda"):
            return "gloo"
        local = next((w.get() for w in weights if not w.sharded), None)
        if local is not None and local.is_cuda and cuda_ipc.device_uuid(local.device) == info.device_uuid:
            return "cuda_ipc"
        return "nccl" if torch.cuda.is_available() else "gloo"

    def _push_group(
        self, backend: str, manifest: Manifest, weights: list[FullWeight], version: int | None, pause: str
    ) -> int:
        client = self._client()
        group = self._group(backend)
        self._begin(client, manifest=manifest.to_wire(), version=version, pause=pause)
        receive = client.start_call("receive_weight_buckets")
        try:
            group.send(manifest, (w.get() for w in weights))
        except BaseException:
            with contextlib.suppress(Exception):
                client.call("abort_weight_update", timeout_s=30.0)
            raise
        return client.wait_call(receive, "receive_weight_buckets", self.timeout_s)

    def _group(self, backend: str) -> WeightGroup:
        if self.group is not None:
            if self.group.backend != backend:
                raise ValueError(f"this sender's group is {self.group.backend}, not {backend}")
            return self.group
        client = self._client()
        device = (
            torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        )
        store = WeightGroup.host_store(self.host, 0, 2, self.timeout_s)
        args = dict(
            host=self.host, port=store.port, rank=1, world_size=2, backend=backend, timeout_s=self.timeout_s
        )
        # Refused at once (another sender's group is open: the LLM's own, or one that died) before
        # this process starts a rendezvous no engine would join: its thread would wait out the whole
        # timeout, and a process exiting meanwhile aborts in the store's C++ destructor.
        check = client.start_call("init_weight_group", check_only=True, **args)
        client.wait_call(check, "init_weight_group", self.timeout_s)
        joined = client.start_call("init_weight_group", **args)
        # Host the group in a thread while listening for the engine's answer: an engine that refuses
        # now (another sender's group opened between the check and this call) answers at once, and
        # the rendezvous would otherwise wait out the whole timeout for a peer that never comes
        # (after such a refusal the thread still does, in the background, and ends with its timeout).
        made: list[WeightGroup | BaseException] = []

        def host() -> None:
            try:
                made.append(
                    WeightGroup(self.host, store.port, 0, 2, backend, device, self.timeout_s, store=store)
                )
            except BaseException as e:  # noqa: BLE001 (re-raised below)
                made.append(e)

        thread = threading.Thread(target=host, name="rollout-weight-group", daemon=True)
        thread.start()
        answered = False
        while thread.is_alive() and not answered:
            try:
                client.wait_call(joined, "init_weight_group", 0.2)  # raises the engine's refusal
                answered = True
            except TimeoutError:
                pass
        thread.join()
        if isinstance(made[0], BaseException):
            raise made[0]
        self.group = made[0]
        if not answered:
            client.wait_call(joined, "init_weight_group", self.timeout_s)
        return self.group

    def _push_ipc(
        self, manifest: Manifest, weights: list[FullWeight], version: int | None, pause: str
    ) -> int:
        client = self._client()
        device = torch.device("cuda", torch.cuda.current_device())
        size = max(manifest.bucket_sizes, default=0)
        nbuf = min(2, manifest.num_buckets)
        if len(self._ipc_buffers) != nbuf or any(b.numel() < size for b in self._ipc_buffers):
            self._ipc_buffers = [
                torch.empty(max(size, 1), dtype=torch.uint8, device=device) for _ in range(nbuf)
            ]
        handles = [cuda_ipc.share(b) for b in self._ipc_buffers]
        self._begin(client, manifest=manifest.to_wire(), version=version, pause=pause, buffers=handles)
        tensors = (w.get() for w in weights)
        pending: list[int | None] = [None] * nbuf
        try:
            for b in range(manifest.num_buckets):
                slot = b % nbuf
                if pending[slot] is not None:
                    client.wait_call(pending[slot], "weight_bucket", self.timeout_s)  # buffer free again
                entries = manifest.bucket_entries(b)
                pack((next(tensors) for _ in entries), entries, self._ipc_buffers[slot])
                torch.cuda.current_stream(device).synchronize()  # packed before the engine reads
                pending[slot] = client.start_call("weight_bucket", index=b)
            for cid in pending:
                if cid is not None:
                    client.wait_call(cid, "weight_bucket", self.timeout_s)
        except BaseException:
            with contextlib.suppress(Exception):
                client.call("abort_weight_update", timeout_s=30.0)
            raise
        return client.call("finish_weight_update", timeout_s=self.timeout_s)

    # ---- helpers ------------------------------------------------------------------------------
    def _begin(self, client: EngineControl, **args: Any) -> None:
        """``begin_weight_update``; if it gets no answer (pause "wait": a drain longer than our
        timeout), withdraw it, or the engine would open the update once drained and hold every
        request for buckets that never come."""
        try:
            # the engine ends the update by itself if this process goes silent for as long
            lease_s = min(self.timeout_s, 1e9)
            client.call("begin_weight_update", timeout_s=self.timeout_s, lease_s=lease_s, **args)
        except (ValueError, TypeError):
            raise  # refused: nothing is open
        except BaseException:
            with contextlib.suppress(Exception):
                client.call("abort_weight_update", timeout_s=30.0)
            raise

    def _client(self) -> EngineControl:
        assert self.llm is not None
        if callable(getattr(type(self.llm), "start_call", None)):
            return self.llm  # a control channel itself
        client = self.llm.client
        if client is None:
            raise ValueError("this LLM runs in process; its weights are updated directly")
        return client

    def _wire_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """Floating weights travel in the engine's dtype (the cast happens while packing)."""
        if not dtype.is_floating_point:
            return dtype  # the engine rejects it by name during validation
        return DTYPES[self._client().info.dtype]
