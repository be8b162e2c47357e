"""The engine core's control plane: an explicit state machine around ``EngineCore``.

States (``EngineState``)::

    running --pause(wait)--> draining --(in-flight requests done)--> paused
    running/draining --pause(keep)--> paused      (in-flight requests frozen, their KV kept)
    any --pause(abort)--> paused                  (in-flight requests aborted, partial outputs sent)
    draining/paused --resume()--> running         (frozen requests continue, held ones start)

While not running, new requests are validated and held (in arrival order); they enter the engine on
``resume()``. Every call is idempotent (pausing a paused engine changes nothing but what the mode
itself asks for; resuming a running one is a no-op) and answered by exactly one ``ControlAck``;
``pause(mode="wait")`` is answered once the engine is paused. ``sleeping`` and
``updating_weights`` are reserved for ``sleep()``/``wake_up()`` and ``update_weights()`` (weight
sync); they will hold new requests the same way ``paused`` does.

The plane is plain Python over messages: ``handle(msg)`` and ``step()`` put what must be sent into
``outbox``; the core process only moves frames. Tests drive it in-process.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence
from typing import Any

from rollout.engine import EngineCore
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

PAUSE_MODES = ("abort", "wait", "keep")


class EngineState(str, enum.Enum):
    RUNNING = "running"  # admitting and stepping
    DRAINING = "draining"  # pause(wait): stepping in-flight requests, holding new ones
    PAUSED = "paused"  # not stepping; in-flight requests (mode "keep") keep their KV blocks
    SLEEPING = "sleeping"  # reserved: KV cache / weights released (sleep / wake_up)
    UPDATING_WEIGHTS = "updating_weights"  # reserved: weights being replaced (update_weights)


@dataclasses.dataclass
class _Held:
    """A validated request that arrived while the engine was not running."""

    prompt: str | list[int]
    params: SamplingParams


class ControlPlane:
    """Routes messages to one ``EngineCore`` under the state machine described in the module doc."""

    def __init__(self, engine: EngineCore) -> None:
        self.engine = engine
        self.state = EngineState.RUNNING
        self.pause_mode: str | None = None  # the mode of the pause that holds the engine now
        self.outbox: list[Message] = []  # messages to send, in order
        self.shutdown_requested = False
        self.num_rejected_messages = 0  # malformed frames dropped by the core process (get_state)
        self._held: dict[str, _Held] = {}
        self._drain_acks: list[int] = []  # call ids of pause(wait) calls answered once paused

    # ---- the loop ---------------------------------------------------------------------------
    @property
    def can_step(self) -> bool:
        """Whether ``step`` has work: the engine is running or draining and has requests."""
        return self.state in (EngineState.RUNNING, EngineState.DRAINING) and self.engine.has_unfinished()

    def step(self) -> None:
        """One engine step; its deltas go to the outbox."""
        deltas = self.engine.step_deltas()
        if deltas:
            self.outbox.append(Outputs(deltas))
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
                if rid in self.engine.request_ids:
                    raise ValueError(f"request_id {rid!r} is already in use")
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
        try:
            handler = getattr(self, f"_do_{msg.method}")
            result = handler(msg.call_id, **msg.args)
        except (ValueError, TypeError) as e:
            self.outbox.append(ControlAck(msg.call_id, False, None, f"{type(e).__name__}: {e}"))
            return
        if result is not _DEFERRED:
            self.outbox.append(ControlAck(msg.call_id, True, result, None))

    def _do_pause(self, call_id: int, mode: str = "abort") -> Any:
        if mode not in PAUSE_MODES:
            raise ValueError(f"pause mode must be one of {PAUSE_MODES}, got {mode!r}")
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
            "num_rejected_messages": self.num_rejected_messages,
            "stats": dataclasses.asdict(self.engine.stats()),
        }

    def _do_shutdown(self, call_id: int) -> bool:
        self.shutdown_requested = True
        return True

    # ---- transitions ------------------------------------------------------------------------
    def _enter_paused(self, mode: str) -> None:
        self.state, self.pause_mode = EngineState.PAUSED, mode
        self._answer_drains()

    def _settle(self) -> None:
        """Finish a drain once nothing is in flight."""
        if self.state is EngineState.DRAINING and not self.engine.has_unfinished():
            self.state = EngineState.PAUSED
            self._answer_drains()

    def _answer_drains(self) -> None:
        for cid in self._drain_acks:
            self.outbox.append(ControlAck(cid, True, self.state.value, None))
        self._drain_acks.clear()


_DEFERRED = object()  # a control call answered later (pause "wait")


def _empty_abort(request_id: str, n: int) -> RequestDelta:
    """The last delta of a prompt aborted before it entered the engine."""
    samples = [SampleDelta(i, [], [], None, [], "abort", None, None, 0, 0) for i in range(n)]
    return RequestDelta(request_id, samples, True)
