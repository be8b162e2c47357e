"""The engine core's control plane: an explicit state machine around ``EngineCore``.

States (``EngineState``)::

    running --pause(wait)--> draining --(in-flight requests done)--> paused
    running/draining --pause(keep)--> paused      (in-flight requests frozen, their KV kept)
    any --pause(abort)--> paused                  (in-flight requests aborted, partial outputs sent)
    draining/paused --resume()--> running         (frozen requests continue, held ones start)

While not running, new requests are validated and held (in arrival order); they enter the engine on
``resume()``. Every call is idempotent (pausing a paused engine changes nothing but what the mode
itself asks for; resuming a running one is a no-op) and answered by exactly one ``ControlAck``;
``pause(mode="wait")`` is answered once the engine is paused.

Weight updates and sleep run "exclusively": at a step boundary, after the caller's pause mode
("keep": in-flight requests are frozen and continue on the new weights; "abort": they end with
their partial outputs; "wait": they finish first, new ones are held meanwhile)::

    running/paused --update--> updating_weights --done--> the state before
    running/paused --sleep--> sleeping --wake_up (all tags)--> the state before
    (after sleep(2): sleeping --wake_up--> updating_weights --complete update--> the state before)

Requests arriving meanwhile are held. A bucketed update (process group or CUDA IPC) stays in
``updating_weights`` from ``begin_weight_update`` to its last bucket. An update that fails after
writing (a sender that died mid-stream) leaves ``updating_weights`` with the engine refusing to serve
until a complete update arrives; one that fails validation changes nothing. An open update holds a
lease (``lease_s``, renewed by each bucket): a sender that goes silent for longer (a trainer killed
between calls) has its update ended by ``expire_lease`` as if it had aborted it.

The plane is plain Python over messages: ``handle(msg)`` and ``step()`` put what must be sent into
``outbox``; the core process only moves frames. Tests drive it in-process.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from rollout.engine import EngineCore, sample_ids
from rollout.messages import (
    AbortRequests,
    AddRequest,
    ControlAck,
    ControlCall,
    Message,
    MessageError,
    Outputs,
    RequestFailed,
)
from rollout.outputs import RequestDelta, SampleDelta
from rollout.samplers.params import SamplingParams
from rollout.weight_sync.manifest import Manifest

PAUSE_MODES = ("abort", "wait", "keep")
DEFAULT_LEASE_S = 600.0  # how long an open bucketed update waits for its sender's next call

log = logging.getLogger(__name__)


def check_pause_mode(mode: str) -> None:
    """ValueError unless ``mode`` is one of ``PAUSE_MODES``."""
    if mode not in PAUSE_MODES:
        raise ValueError(f"pause mode must be one of {PAUSE_MODES}, got {mode!r}")


class EngineState(str, enum.Enum):
    RUNNING = "running"  # admitting and stepping
    DRAINING = "draining"  # pause(wait): stepping in-flight requests, holding new ones
    PAUSED = "paused"  # not stepping; in-flight requests (mode "keep") keep their KV blocks
    SLEEPING = "sleeping"  # KV cache / weights released (sleep / wake_up); requests held
    UPDATING_WEIGHTS = "updating_weights"  # weights being replaced; requests held


@dataclasses.dataclass
class _Held:
    """A validated request that arrived while the engine was not running."""

    prompt: str | list[int]
    params: SamplingParams


class ControlPlane:
    """Routes messages to one ``EngineCore`` under the state machine described in the module doc."""

    def __init__(self, engine: EngineCore, clock: Callable[[], float] = time.monotonic) -> None:
        self.engine = engine
        self.clock = clock  # seconds, for the open update's lease
        self.state = EngineState.RUNNING
        self.pause_mode: str | None = None  # the mode of the pause that holds the engine now
        self.outbox: list[Message] = []  # messages to send, in order
        self.shutdown_requested = False
        self.num_rejected_messages = 0  # malformed frames dropped by the core process (get_state)
        self._held: dict[str, _Held] = {}
        self._drain_acks: list[int] = []  # call ids of pause(wait) calls answered once paused
        # Exclusive calls with pause "wait", run once the in-flight requests finished.
        self._after_drain: list[tuple[int, Callable[[], Any], EngineState]] = []
        self._resume_to: EngineState | None = None  # the state an exclusive call returns to
        self._update_version = 0  # the version the open bucketed update will set
        self._deferred_begin: int | None = None  # call id of a begin_weight_update waiting for a drain
        self._lease_s = DEFAULT_LEASE_S  # the open update's lease, renewed by each bucket
        self._lease_end: float | None = None  # when the open update expires (clock seconds)
        self.num_expired_updates = 0

    # ---- the loop ---------------------------------------------------------------------------
    @property
    def can_step(self) -> bool:
        """Whether ``step`` has work: the engine is running or draining and has requests."""
        return self.state in (EngineState.RUNNING, EngineState.DRAINING) and self.engine.has_unfinished()

    def lease_left_s(self) -> float | None:
        """Seconds until the open bucketed update's lease runs out (0 once it has); None without one."""
        if self._lease_end is None or not self.engine.weights.in_progress:
            return None
        return max(0.0, self._lease_end - self.clock())

    def expire_lease(self) -> bool:
        """End the open bucketed update if its sender has been silent past the lease, as
        ``abort_weight_update`` would: the engine returns to where it was, or, if buckets were
        written, holds requests until a complete update. Returns whether it ended one."""
        left = self.lease_left_s()
        if left is None or left > 0:
            return False
        self._lease_end = None
        log.warning("no call for the open weight update in %.0f s: ending it", self._lease_s)
        self.engine.weights.end(complete=False)
        self.num_expired_updates += 1
        self._after_failed_update()
        self._settle()  # as after a message: an update that stopped a drain hands it back to _settle
        return True

    def step(self) -> None:
        """One engine step; its deltas go to the outbox."""
        deltas, tokens = self.engine.step_outputs()
        if deltas or tokens:
            self.outbox.append(Outputs(deltas, tokens))
        self._settle()

    def handle(self, msg: Message) -> None:
        """Apply one client message (already decoded and type-checked)."""
        if isinstance(msg, AddRequest):
            self._add(msg)
        elif isinstance(msg, AbortRequests):
            self._abort(msg.request_ids)
        elif isinstance(msg, ControlCall):
            self._call(msg)
        else:
            raise MessageError(f"the core does not accept {type(msg).__name__} messages")
        self._settle()

    # ---- requests ---------------------------------------------------------------------------
    def _add(self, msg: AddRequest) -> None:
        rid = msg.request_id
        try:
            if (msg.prompt is None) == (msg.prompt_token_ids is None):
                raise ValueError("exactly one of prompt / prompt_token_ids must be set")
            prompt: str | list[int] = msg.prompt if msg.prompt is not None else msg.prompt_token_ids
            params = SamplingParams.from_dict(msg.params)
            if rid in self._held:
                raise ValueError(f"request_id {rid!r} is already in use")
            if self.state is EngineState.RUNNING:
                self.engine.add_request(rid, prompt, params)
            else:
                # what add_request checks at resume(), against the engine's and the held requests
                self.engine.check_request_id(rid, params.n)
                mine = set(sample_ids(rid, params.n))
                for other, held in self._held.items():
                    if not mine.isdisjoint(sample_ids(other, held.params.n)):
                        raise ValueError(f"request_id {rid!r}: a sample id is taken by request {other!r}")
                self.engine.tokenize(prompt)
                self.engine.check_params(params)
                self._held[rid] = _Held(prompt, params)
        except (ValueError, TypeError) as e:
            self.outbox.append(RequestFailed(rid, type(e).__name__, str(e)))

    def _abort(self, request_ids: Sequence[str]) -> None:
        deltas = self.engine.abort_deltas(request_ids)
        for rid in request_ids:
            held = self._held.pop(rid, None)
            if held is not None:
                deltas.append(_empty_abort(rid, held.params.n))
        if deltas:
            self.outbox.append(Outputs(deltas))

    def _abort_everything(self) -> None:
        self._abort([*self.engine.request_ids, *self._held])

    # ---- control calls ----------------------------------------------------------------------
    def _call(self, msg: ControlCall) -> None:
        handler = getattr(self, f"_do_{msg.method}", None)
        if handler is None:
            self.outbox.append(
                ControlAck(msg.call_id, False, None, f"ValueError: no control method {msg.method!r}")
            )
            return
        try:
            result = handler(msg.call_id, **msg.args)
        except (ValueError, TypeError, TransferError) as e:
            self.outbox.append(ControlAck(msg.call_id, False, None, f"{type(e).__name__}: {e}"))
            return
        if result is not _DEFERRED:
            self.outbox.append(ControlAck(msg.call_id, True, result, None))

    def _do_pause(self, call_id: int, mode: str = "abort") -> Any:
        check_pause_mode(mode)
        if self.state in (EngineState.SLEEPING, EngineState.UPDATING_WEIGHTS) or self._after_drain:
            raise ValueError(f"the engine is {self.state.value}; it does not take pause() now")
        if mode == "abort":
            self._abort_everything()
            self._enter_paused(mode)
        elif mode == "keep":
            if self.state is not EngineState.PAUSED:
                self._enter_paused(mode)
        elif self.state is EngineState.RUNNING:
            self.state, self.pause_mode = EngineState.DRAINING, mode
            self._drain_acks.append(call_id)
            return _DEFERRED  # answered by _settle once the in-flight requests are done
        elif self.state is EngineState.DRAINING:
            self._drain_acks.append(call_id)
            return _DEFERRED
        return self.state.value

    def _do_resume(self, call_id: int) -> str:
        if self.state in (EngineState.SLEEPING, EngineState.UPDATING_WEIGHTS):
            raise ValueError(f"cannot resume while {self.state.value}: wake_up() or finish the update")
        if self._after_drain:
            raise ValueError("an exclusive call waits for the drain; it resumes by itself")
        if self.state is EngineState.DRAINING:
            for cid in self._drain_acks:
                self.outbox.append(
                    ControlAck(cid, False, None, "RuntimeError: resume() came before the drain")
                )
            self._drain_acks.clear()
        self.state, self.pause_mode = EngineState.RUNNING, None
        held, self._held = self._held, {}
        for rid, h in held.items():
            try:
                self.engine.add_request(rid, h.prompt, h.params)
            except (ValueError, TypeError) as e:  # validated on arrival: only a changed engine gets here
                self.outbox.append(RequestFailed(rid, type(e).__name__, str(e)))
        return self.state.value

    def _do_abort_all(self, call_id: int) -> int:
        n = len(self.engine.request_ids) + len(self._held)
        self._abort_everything()
        return n

    def _do_reset_prefix_cache(self, call_id: int) -> bool:
        return self.engine.blocks.reset_prefix_cache()

    def _do_get_state(self, call_id: int, check_invariants: bool = False) -> dict[str, Any]:
        if check_invariants:
            self.engine.check_invariants()  # AssertionError: a bug; the core reports it and exits
        sched = self.engine.scheduler
        return {
            "state": self.state.value,
            "pause_mode": self.pause_mode,
            "num_requests": len(self.engine.request_ids),
            "num_running": len(sched.running),
            "num_waiting": len(sched.waiting),
            "num_held": len(self._held),
            "weight_version": self.engine.weight_version,
            "weights_valid": self.engine.weights_valid,
            "sleep_level": self.engine.memory.level,
            "released": sorted(self.engine.memory.released),
            "weight_group": self.engine.weights.group is not None,
            "num_rejected_messages": self.num_rejected_messages,
            "num_expired_updates": self.num_expired_updates,
            "stats": dataclasses.asdict(self.engine.stats()),
        }

    def _do_shutdown(self, call_id: int) -> bool:
        self.shutdown_requested = True
        return True

    # ---- weights and memory (exclusive calls) ---------------------------------------------------
    def _do_update_weights_from_disk(
        self, call_id: int, path: str, version: int | None = None, pause: str = "keep"
    ) -> Any:
        # Refuse a bad update before the pause: "abort" must not end the requests in flight (nor
        # "wait" drain them) for an update that changes nothing. The action checks again.
        self.engine.next_weight_version(version)
        self.engine.weights.check_disk(path)

        def action() -> int:
            return self.engine.update_weights_from_disk(path, version)

        return self._exclusive(call_id, pause, action, EngineState.UPDATING_WEIGHTS)

    def _do_init_weight_group(
        self,
        call_id: int,
        host: str,
        port: int,
        rank: int,
        world_size: int,
        backend: str = "gloo",
        timeout_s: float = 600.0,
        check_only: bool = False,
    ) -> bool:
        """Join the sender's process group (blocks until every rank joined). ``check_only``: answer at
        once whether this engine would join (no group open yet, arguments valid), joining nothing."""
        try:
            self.engine.weights.init_group(host, port, rank, world_size, backend, timeout_s, check_only)
        except (RuntimeError, OSError) as e:  # rendezvous failed: the engine keeps serving
            raise TransferError(f"joining the weight group failed: {e}") from None
        return True

    def _do_destroy_weight_group(self, call_id: int) -> bool:
        return self.engine.weights.destroy_group()

    def _do_begin_weight_update(
        self,
        call_id: int,
        manifest: Any,
        version: int | None = None,
        pause: str = "keep",
        buffers: list[dict[str, Any]] | None = None,
        lease_s: float = DEFAULT_LEASE_S,
    ) -> Any:
        """Open a bucketed update (answered once the engine is stopped under ``pause`` and the whole
        manifest validated; nothing is written yet). The buckets then come over the weight group
        (``receive_weight_buckets``) or, with ``buffers``, over CUDA IPC (``weight_bucket`` for each,
        in order, then ``finish_weight_update``). The engine holds requests until the update ends,
        or until ``lease_s`` seconds pass without a call for it (the sender is taken to be gone)."""
        if isinstance(lease_s, bool) or not isinstance(lease_s, int | float) or not 0 < lease_s <= 1e9:
            raise ValueError(f"lease_s must be a number of seconds in (0, 1e9], got {lease_s!r}")
        parsed = Manifest.from_wire(manifest)
        self.engine.next_weight_version(version)  # before the pause, as update_weights_from_disk
        self.engine.weights.check_manifest(parsed)

        def action() -> int:
            self._deferred_begin = None
            self.engine.check_can_update()
            self._update_version = self.engine.next_weight_version(version)
            self.engine.weights.begin(parsed, buffers)
            self._lease_s, self._lease_end = float(lease_s), self.clock() + lease_s
            return self._update_version

        result = self._exclusive(call_id, pause, action, EngineState.UPDATING_WEIGHTS, stay=True)
        if result is _DEFERRED:
            self._deferred_begin = call_id
        return result

    def _do_receive_weight_buckets(self, call_id: int) -> int:
        """Receive the open update's buckets from the group's rank 0 and commit it."""
        self._bucket_transfer(self.engine.weights.receive_group)
        return self._do_finish_weight_update(call_id)

    def _do_weight_bucket(self, call_id: int, index: int) -> int:
        self._bucket_transfer(lambda: self.engine.weights.copy_bucket(index))
        self._lease_end = self.clock() + self._lease_s  # the sender is alive
        return index

    def _bucket_transfer(self, fn: Callable[[], Any]) -> None:
        """A transport failure ends the open update (a sender that died cannot go on)."""
        try:
            self._transfer(fn)
        except TransferError:
            self.engine.weights.end(complete=False)
            self._after_failed_update()
            raise

    def _do_finish_weight_update(self, call_id: int) -> int:
        try:
            self.engine.weights.end(complete=True)
        except ValueError:
            self._after_failed_update()
            raise
        version = self.engine.commit_weights(self._update_version)
        if self.state is EngineState.UPDATING_WEIGHTS:  # not when it came inside a sleep
            self._leave_exclusive()
        return version

    def _do_abort_weight_update(self, call_id: int) -> bool:
        """Drop the open update (its sender failed). If buckets were written already the weights are a
        mix, and the engine holds requests until a complete update arrives. A begin still waiting
        for the drain (its sender gave up waiting) is withdrawn."""
        if self._deferred_begin is not None:
            cid, self._deferred_begin = self._deferred_begin, None
            self._after_drain = [entry for entry in self._after_drain if entry[0] != cid]
            self.outbox.append(ControlAck(cid, False, None, "ValueError: the weight update was aborted"))
            if not self._after_drain and not self._drain_acks and self.state is EngineState.DRAINING:
                self._do_resume(0)  # the drain was for this update only: back to running
            return True
        if not self.engine.weights.in_progress:
            return False
        self.engine.weights.end(complete=False)
        self._after_failed_update()
        return True

    def _after_failed_update(self) -> None:
        if self.engine.weights_valid and self.state is EngineState.UPDATING_WEIGHTS:
            self._leave_exclusive()

    def _do_sleep(self, call_id: int, level: int = 1, pause: str = "abort") -> Any:
        if pause == "keep":
            raise ValueError("sleep frees the KV cache: pause must be 'abort' or 'wait', not 'keep'")

        def action() -> dict[str, float]:
            return self.engine.sleep(level)

        return self._exclusive(call_id, pause, action, EngineState.SLEEPING, stay=True)

    def _do_wake_up(self, call_id: int, tags: list[str] | None = None) -> dict[str, Any]:
        info = dict(self.engine.wake_up(tags))
        if self.state is EngineState.SLEEPING and self.engine.memory.level == 0:
            if self.engine.weights_valid and not self.engine.weights.in_progress:
                self._leave_exclusive()
            else:  # sleep(2) dropped them, or an update opened in the sleep is still open: requests
                # stay held until a complete update (a repair) or the open one ends
                self.state = EngineState.UPDATING_WEIGHTS
        info["state"] = self.state.value
        return info

    def _exclusive(
        self, call_id: int, pause: str, action: Callable[[], Any], state: EngineState, stay: bool = False
    ) -> Any:
        """Run ``action`` with the engine stopped under ``pause``. The engine returns to the state it
        had unless ``stay`` (the action opens a phase a later call ends)."""
        check_pause_mode(pause)
        self._check_not_busy(state)
        if pause == "abort":
            self._abort_everything()
        elif (
            pause == "wait"
            and self.state in (EngineState.RUNNING, EngineState.DRAINING)
            and self.engine.has_unfinished()
        ):

            def deferred() -> Any:
                if self._deferred_begin == call_id:
                    self._deferred_begin = None  # it runs, or is refused, now
                # an earlier deferred call may have left the engine asleep or updating: check again
                self._check_not_busy(state)
                return self._run_exclusive(action, state, stay)

            self._after_drain.append((call_id, deferred, state))
            self.state = EngineState.DRAINING
            return _DEFERRED
        return self._run_exclusive(action, state, stay)

    def _check_not_busy(self, state: EngineState) -> None:
        held = (EngineState.SLEEPING, EngineState.UPDATING_WEIGHTS)
        busy = self._resume_to is not None or self.state in held
        if busy and not (state is EngineState.UPDATING_WEIGHTS and self._may_update_now()):
            raise ValueError(f"the engine is {self.state.value}; finish that first")

    def _may_update_now(self) -> bool:
        """An update may come while asleep with the weights awake (colocated: wake weights, update,
        wake the KV cache) or to repair weights left incomplete by a failed update."""
        if self.state is EngineState.SLEEPING:
            return self.engine.memory.weights_on_device
        return (
            self.state is EngineState.UPDATING_WEIGHTS
            and not self.engine.weights_valid
            and not self.engine.weights.in_progress
        )

    def _run_exclusive(self, action: Callable[[], Any], state: EngineState, stay: bool) -> Any:
        nested = self._resume_to is not None  # an update inside a sleep or repairing a failed one
        if not nested:
            # DRAINING too: the drain (pause "wait", deferred calls) goes on after this call and
            # _settle ends it (answers the pauses, runs the deferred calls)
            self._resume_to = self.state
            self.state = state
        try:
            result = action()
        except BaseException:
            if not nested and self.engine.weights_valid and not self.engine.weights.in_progress:
                self._leave_exclusive()  # nothing was written: back to where we were
            raise
        if nested and self.state is EngineState.UPDATING_WEIGHTS and self.engine.weights_valid:
            self._leave_exclusive()  # a repair completed
        elif not stay and not nested:
            self._leave_exclusive()
        return result

    def _leave_exclusive(self) -> None:
        target, self._resume_to = self._resume_to or EngineState.RUNNING, None
        self.state = target
        if target is EngineState.RUNNING:
            self._do_resume(0)  # admits the requests held meanwhile
        elif target is EngineState.PAUSED:
            self._answer_drains()

    def _run_after_drain(self) -> None:
        pending, self._after_drain = self._after_drain, []
        # The drain is over: a pause("wait") that drained too is answered now and the calls return
        # the engine to paused, else to running (each call stops the engine itself)
        if self._drain_acks:
            self._enter_paused("wait")
        else:
            self.state = EngineState.RUNNING
        for cid, run, _ in pending:
            try:
                result = run()
            except (ValueError, TypeError, TransferError) as e:
                self.outbox.append(ControlAck(cid, False, None, f"{type(e).__name__}: {e}"))
                continue
            self.outbox.append(ControlAck(cid, True, result, None))

    def _transfer(self, fn: Callable[[], Any]) -> Any:
        """Run a transfer; transport failures (a dead sender, a timeout) become ``TransferError``."""
        try:
            return fn()
        except (ValueError, TypeError):
            raise
        except Exception as e:  # torch.distributed / CUDA errors: the core keeps serving
            raise TransferError(f"{type(e).__name__}: {e}") from None

    # ---- transitions ------------------------------------------------------------------------
    def _enter_paused(self, mode: str) -> None:
        self.state, self.pause_mode = EngineState.PAUSED, mode
        self._answer_drains()

    def _settle(self) -> None:
        """Finish a drain once nothing is in flight."""
        if self.state is EngineState.DRAINING and not self.engine.has_unfinished():
            if self._after_drain:
                self._run_after_drain()
                return
            self.state = EngineState.PAUSED
            self._answer_drains()

    def _answer_drains(self) -> None:
        for cid in self._drain_acks:
            self.outbox.append(ControlAck(cid, True, self.state.value, None))
        self._drain_acks.clear()


_DEFERRED = object()  # a control call answered later (pause "wait")


class TransferError(RuntimeError):
    """A weight transfer failed in the transport (not in validation)."""


def _empty_abort(request_id: str, n: int) -> RequestDelta:
    """The last delta of a prompt aborted before it entered the engine."""
    samples = [SampleDelta(i, [], [], None, [], "abort", None, None, 0, 0) for i in range(n)]
    return RequestDelta(request_id, samples, True)
