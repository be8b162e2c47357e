"""Typed messages between engine clients and the engine core process, encoded with msgpack.

Every message is one msgpack array ``[tag, field_1, ..., field_n]`` (fields in declaration order).
Nothing is pickled. Messages that reach the core come from outside the process, so ``decode`` with
``check=True`` verifies the tag, the field count and every field's type and raises ``MessageError``
on anything else; the core logs and drops such a message and keeps serving. Outputs from the core
are trusted and decoded without the per-field check (it would cost O(tokens) Python per step).

Client -> core: ``AddRequest``, ``AbortRequests``, ``ControlCall``.
Core -> client: ``Ready`` (once, after start-up), ``Outputs`` (per step), ``RequestFailed``,
``ControlAck`` (one per ``ControlCall``), ``EngineDead`` (the core is about to exit on an error).
"""

from __future__ import annotations

import dataclasses
import reprlib
import types
import typing
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar, Union

import msgpack

from rollout.outputs import NewTokens, RequestDelta, SampleDelta

CONTROL_METHODS = (
    "pause",
    "resume",
    "abort_all",
    "reset_prefix_cache",
    "get_state",
    "shutdown",
    # weight sync (rollout.weight_sync) and memory (rollout.memory)
    "update_weights_from_disk",
    "init_weight_group",
    "destroy_weight_group",
    "begin_weight_update",
    "receive_weight_buckets",
    "weight_bucket",
    "finish_weight_update",
    "abort_weight_update",
    "sleep",
    "wake_up",
)
"""Control calls the core answers (see ``rollout.control.ControlPlane``)."""


class MessageError(ValueError):
    """A frame that is not a valid message (bad msgpack, unknown tag, wrong fields or types)."""


# ---- client -> core ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class AddRequest:
    """Queue one prompt. Exactly one of ``prompt_token_ids`` / ``prompt`` is set."""

    TAG: ClassVar[int] = 1
    request_id: str
    prompt_token_ids: list[int] | None  # a validated token-id prompt
    prompt: str | None  # a text prompt, tokenized (and validated) by the core
    params: dict[str, Any]  # SamplingParams.to_dict()


@dataclass(frozen=True)
class AbortRequests:
    """Abort these prompts; each one's last ``RequestDelta`` follows with finish reason "abort"."""

    TAG: ClassVar[int] = 2
    request_ids: list[str]


@dataclass(frozen=True)
class ControlCall:
    """Call a control method of the core (one of ``CONTROL_METHODS``); answered by a ``ControlAck``
    carrying the same ``call_id``."""

    TAG: ClassVar[int] = 3
    call_id: int
    method: str
    args: dict[str, Any]


# ---- core -> client ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Ready:
    """Sent once the engine is built: what a client needs to validate input before sending it."""

    TAG: ClassVar[int] = 10
    info: dict[str, Any]  # vocab_size, max_total_tokens, has_tokenizer, num_blocks, block_size, pid


@dataclass(frozen=True)
class Outputs:
    """What one engine step (or an abort) produced: full deltas, and the one-new-token news of the
    other prompts in columns (``NewTokens``; see ``EngineCore.step_outputs``)."""

    TAG: ClassVar[int] = 11
    deltas: list[RequestDelta]
    tokens: NewTokens = field(default_factory=NewTokens)


@dataclass(frozen=True)
class RequestFailed:
    """The core refused an ``AddRequest`` (bad input it could only check itself, e.g. a text prompt)."""

    TAG: ClassVar[int] = 12
    request_id: str
    error_type: str  # "ValueError" or "TypeError": the client raises that type
    message: str


@dataclass(frozen=True)
class ControlAck:
    """The answer to a ``ControlCall``: its result, or the error it raised."""

    TAG: ClassVar[int] = 13
    call_id: int
    ok: bool
    result: Any  # plain data (msgpack-able); None on error
    error: str | None  # "<Type>: <message>" when not ok


@dataclass(frozen=True)
class EngineDead:
    """The core hit an unrecoverable error and exits; ``error`` carries the traceback."""

    TAG: ClassVar[int] = 14
    error: str


Message = AddRequest | AbortRequests | ControlCall | Ready | Outputs | RequestFailed | ControlAck | EngineDead
_CLASSES = (AddRequest, AbortRequests, ControlCall, Ready, Outputs, RequestFailed, ControlAck, EngineDead)
# tag -> (class, field names, field types): built once at import, read-only afterwards.
_SPECS = MappingProxyType(
    {
        cls.TAG: (
            cls,
            tuple(f.name for f in dataclasses.fields(cls)),
            tuple(typing.get_type_hints(cls)[f.name] for f in dataclasses.fields(cls)),
        )
        for cls in _CLASSES
    }
)


def control_call_id(frame: bytes) -> int | None:
    """The call id of a frame that is a ``ControlCall`` with a valid id but is otherwise malformed
    (unknown method, bad arguments), so the core can refuse it; None for anything else."""
    try:
        values = msgpack.unpackb(frame, raw=False, strict_map_key=False)  # as decode() reads it
    except Exception:
        return None
    if isinstance(values, list) and len(values) >= 2 and values[0] == ControlCall.TAG:
        call_id = values[1]
        if isinstance(call_id, int) and not isinstance(call_id, bool):
            return call_id
    return None


def encode(msg: Message) -> bytes:
    """One frame for ``msg``."""
    fields = _SPECS[msg.TAG][1]
    return msgpack.packb([msg.TAG, *(getattr(msg, f) for f in fields)], default=_to_wire)


def decode(frame: bytes, *, check: bool = True) -> Message:
    """The message in ``frame``. Raises ``MessageError`` when it is not one (with ``check``, also when
    a field has the wrong type)."""
    try:
        data = msgpack.unpackb(frame, strict_map_key=False)
    except Exception as e:  # msgpack raises several types (ExtraData, FormatError, ValueError, ...)
        raise MessageError(f"not msgpack: {e}") from None
    if not isinstance(data, list) or not data or type(data[0]) is not int or data[0] not in _SPECS:
        raise MessageError(f"not a message (expected [tag, fields...]): {_preview(data)}")
    cls, names, hints = _SPECS[data[0]]
    values = data[1:]
    if len(values) != len(names):
        raise MessageError(f"{cls.__name__} needs {len(names)} fields {names}, got {len(values)}")
    if cls is Outputs:
        try:
            return Outputs([_delta_from_wire(d) for d in values[0]], NewTokens(*values[1]))
        except (TypeError, ValueError, IndexError) as e:
            raise MessageError(f"bad Outputs: {e}") from None
    if check:
        for name, hint, value in zip(names, hints, values, strict=True):
            if not _matches(value, hint):
                raise MessageError(f"{cls.__name__}.{name} must be {_type_name(hint)}, got {_preview(value)}")
    if cls is ControlCall and values[1] not in CONTROL_METHODS:
        raise MessageError(f"unknown control method {values[1]!r}; known: {', '.join(CONTROL_METHODS)}")
    return cls(*values)


# ---- deltas on the wire (positional arrays: compact, and cheap to build per step) -----------------
def _to_wire(obj: object) -> list[Any]:
    if isinstance(obj, NewTokens):
        return [obj.request_ids, obj.indexes, obj.token_ids, obj.logprobs, obj.weight_versions]
    if isinstance(obj, RequestDelta):
        return [
            obj.request_id,
            obj.samples,
            obj.finished,
            obj.prompt_token_ids,
            obj.prompt_logprobs,
            obj.prompt_top_logprobs,
        ]
    if isinstance(obj, SampleDelta):
        return [
            obj.index,
            obj.token_ids,
            obj.logprobs,
            obj.top_logprobs,
            obj.weight_versions,
            obj.finish_reason,
            obj.stop_reason,
            obj.text,
            obj.num_cached_tokens,
            obj.num_preemptions,
        ]
    raise TypeError(f"cannot encode {type(obj).__name__} in a message")


def _delta_from_wire(d: list[Any]) -> RequestDelta:
    rid, samples, finished, prompt_ids, prompt_lps, prompt_tops = d
    return RequestDelta(
        rid, [SampleDelta(*s) for s in samples], finished, prompt_ids, prompt_lps, prompt_tops
    )


# ---- type checks of decoded fields ------------------------------------------------------------------
def _matches(value: object, hint: Any) -> bool:
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return any(_matches(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is int:
        return type(value) is int
    if hint is float:
        return type(value) in (float, int)
    if hint in (str, bool):
        return type(value) is hint
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            return False
        if item is int:  # prompts: thousands of ids per message, checked without a call per id
            return all(type(v) is int for v in value)
        return all(_matches(v, item) for v in value)
    if origin is dict:
        key, item = typing.get_args(hint)
        return isinstance(value, dict) and all(
            _matches(k, key) and _matches(v, item) for k, v in value.items()
        )
    raise TypeError(f"messages cannot check fields of type {hint!r}")  # a bug in a message class


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


_PREVIEW = reprlib.Repr()  # bounded depth: a hostile frame nests as deep as msgpack allows
_PREVIEW.maxlevel = 4


def _preview(value: object, limit: int = 80) -> str:
    text = _PREVIEW.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
