"""``AsyncLLM``: streaming generation from asyncio over an engine core process.

One background task per event loop reads the core's output socket and hands each prompt's deltas
to that prompt's stream; ``generate`` is an async iterator over one stream. Control calls are
futures answered by the core's acknowledgements. When the core dies or fails, every stream and
pending call raises ``EngineDeadError`` with the cause (the reader polls the process while the
socket is quiet, so this takes at most ~``liveness_interval`` seconds), and so does every later call.

Streamed text is decoded here, off the core's loop: the first request that asks for text
(``detokenize``, the default, on a model with a tokenizer) loads the model's tokenizer in this process,
in a thread; token-id-only requests never load it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.asyncio

from rollout.client import EngineCoreClient, EngineDeadError, EngineInfo, ack_result
from rollout.detokenizer import Detokenizer, IncrementalDetokenizer
from rollout.messages import AbortRequests, AddRequest, ControlAck, ControlCall, Outputs, RequestFailed
from rollout.outputs import RequestOutput
from rollout.samplers.params import SamplingParams
from rollout.stream import OUTPUT_KINDS, OutputAccumulator, OutputKind
from rollout.validation import check_params, check_prompt_ids

Prompt = str | Sequence[int]


@dataclass(eq=False)
class _Stream:
    acc: OutputAccumulator
    event: asyncio.Event = field(default_factory=asyncio.Event)
    error: BaseException | None = None
    # The caller left before the end: the stream stays registered (its id stays taken) until the
    # abort's last delta arrives, so a new request reusing the id never sees the old one's outputs.
    orphaned: bool = False


class AsyncLLM:
    """Generate from asyncio with many concurrent requests. Use as ``async with AsyncLLM(...)`` or
    ``with``, or call ``shutdown()``; the core process is also stopped when the object is collected
    or the interpreter exits. One ``AsyncLLM`` serves one event loop at a time.

    >>> async for out in llm.generate([1, 2, 3], SamplingParams(max_tokens=8), request_id="r0"):
    ...     print(out.outputs[0].token_ids, out.outputs[0].text)  # cumulative by default
    """

    def __init__(self, model: str, *, liveness_interval: float = 0.25, **engine_kwargs: Any) -> None:
        """Start an engine core process for ``model``; ``engine_kwargs`` go to ``EngineCoreClient``
        (``EngineCore``'s arguments, ``engine_class``, ``startup_timeout``, ``env``). Blocks until the
        engine is ready (seconds: the core imports torch and builds the model)."""
        self.client = EngineCoreClient(model, **engine_kwargs)
        self.info: EngineInfo = self.client.info
        self._liveness_ms = int(liveness_interval * 1000)
        self._streams: dict[str, _Stream] = {}
        self._calls: dict[int, asyncio.Future[Any]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reader: asyncio.Task[None] | None = None
        self._tokenizer_lock = threading.Lock()
        self._tokenizer_loaded = False
        self._detokenizer: Detokenizer | None = None  # the model's tokenizer, once loaded

    # ---- generation -------------------------------------------------------------------------
    async def generate(
        self,
        prompt: Prompt,
        sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
        *,
        output_kind: OutputKind = "cumulative",
    ) -> AsyncIterator[RequestOutput]:
        """Stream one prompt's outputs until it finishes: each step's new tokens and text
        (``"delta"``) or everything so far (``"cumulative"``). Text (with ``params.detokenize`` on a
        model with a tokenizer) never shows what a stop string will cut: the last ``len(stop) - 1``
        characters wait until the end. Bad input raises ValueError/TypeError before anything is sent
        (text prompts are checked by the core, and raise here too). Leaving the loop early (break,
        cancellation) aborts the request. An aborted request ends normally: its last output has finish
        reason "abort" and the tokens generated until then."""
        params = SamplingParams() if sampling_params is None else sampling_params
        rid = uuid.uuid4().hex if request_id is None else request_id
        wants_text = isinstance(params, SamplingParams) and params.detokenize and self.info.has_tokenizer
        if wants_text and not self._tokenizer_loaded:
            await asyncio.to_thread(self.get_tokenizer)  # seconds for a large one: not on the loop
        msg, acc = self._prepare(prompt, params, rid, output_kind)
        self._ensure_reader()
        stream = _Stream(acc)
        self._streams[rid] = stream
        try:
            self.client.send(msg)
        except BaseException:  # not sent (the core never saw it): nothing to abort, nothing kept
            del self._streams[rid]
            raise
        try:
            while True:
                await stream.event.wait()
                stream.event.clear()
                if stream.error is not None:
                    raise stream.error
                out = acc.take(output_kind)
                if out is not None:
                    yield out
                if acc.finished:
                    return
        finally:
            if self._streams.get(rid) is stream:
                if not acc.finished and not self.client.is_dead and stream.error is None:
                    stream.orphaned = True
                    self._send_quietly(AbortRequests([rid]))
                else:
                    del self._streams[rid]

    def _prepare(
        self, prompt: Prompt, params: SamplingParams, rid: str, kind: str
    ) -> tuple[AddRequest, OutputAccumulator]:
        if not isinstance(rid, str):
            raise TypeError(f"request_id must be a str, got {type(rid).__name__}")
        if not rid.isascii() and not _utf8(rid):
            raise ValueError(f"request_id must be encodable as UTF-8, got {rid!r}")
        if kind not in OUTPUT_KINDS:
            raise ValueError(f"output_kind must be one of {OUTPUT_KINDS}, got {kind!r}")
        if rid in self._streams:
            raise ValueError(f"request_id {rid!r} is already in use")
        self.client.check_alive()
        info = self.info
        check_params(params, info.vocab_size, info.has_tokenizer)
        if isinstance(prompt, str):
            if not info.has_tokenizer:
                raise ValueError("text prompts need a tokenizer; this model has none: pass token ids")
            ids, text = None, prompt
        else:
            ids, text = check_prompt_ids(prompt, info.vocab_size, info.max_total_tokens), None
        new_detok = None
        if params.detokenize and self._detokenizer is not None:
            new_detok = functools.partial(IncrementalDetokenizer.for_params, self._detokenizer, params)
        acc = OutputAccumulator(rid, ids, text, params.n, bool(params.logprobs), new_detok)
        return AddRequest(rid, ids, text, params.to_dict()), acc

    def get_tokenizer(self) -> Any | None:
        """The model's Hugging Face tokenizer, loaded in this process on first use (once; None when
        the model has none)."""
        with self._tokenizer_lock:
            if not self._tokenizer_loaded:
                if self.info.has_tokenizer:
                    self._detokenizer = Detokenizer.from_pretrained(self.client.model_path)
                self._tokenizer_loaded = True
        return None if self._detokenizer is None else self._detokenizer.tokenizer

    async def abort(self, request_ids: str | Sequence[str]) -> None:
        """Abort requests: their streams end with finish reason "abort" and their partial outputs.
        Unknown or finished ids are ignored."""
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        self.client.send(AbortRequests(ids))

    # ---- control plane ----------------------------------------------------------------------
    async def pause(self, mode: str = "abort") -> str:
        """Stop generating. ``"abort"``: abort in-flight requests (their streams end with reason
        "abort"); ``"wait"``: hold new requests and return once in-flight ones finished; ``"keep"``:
        freeze in-flight requests, keeping their KV cache. New requests wait until ``resume()``.
        Returns the state ("paused")."""
        return await self.call("pause", mode=mode)

    async def resume(self) -> str:
        """Continue frozen requests and start the held ones. Returns the state ("running")."""
        return await self.call("resume")

    async def abort_all(self) -> int:
        """Abort every request in the engine; returns how many there were."""
        return await self.call("abort_all")

    async def reset_prefix_cache(self) -> bool:
        return await self.call("reset_prefix_cache")

    async def get_state(self, check_invariants: bool = False) -> dict[str, Any]:
        """State, queue sizes, block usage and counters of the core."""
        return await self.call("get_state", check_invariants=check_invariants)

    async def update_weights_from_disk(
        self, path: str, version: int | None = None, pause: str = "keep"
    ) -> int:
        """Reload the weights from a safetensors directory under ``pause`` ("keep": streams go on
        and their later tokens carry the new version; "abort"; "wait"). Returns the new version."""
        return await self.call("update_weights_from_disk", path=str(path), version=version, pause=pause)

    async def sleep(self, level: int = 1, pause: str = "abort") -> dict[str, Any]:
        """Free device memory (see ``LLM.sleep``); in-flight requests are aborted or ("wait") finished."""
        return await self.call("sleep", level=level, pause=pause)

    async def wake_up(self, tags: list[str] | None = None) -> dict[str, Any]:
        return await self.call("wake_up", tags=tags)

    async def call(self, method: str, **args: Any) -> Any:
        """Run a control call in the core and return its result (raises what it raised)."""
        self._ensure_reader()
        call_id = self.client.next_call_id()
        fut = asyncio.get_running_loop().create_future()
        self._calls[call_id] = fut
        try:
            self.client.send(ControlCall(call_id, method, args))
            return await fut
        finally:
            self._calls.pop(call_id, None)

    # ---- the output reader ------------------------------------------------------------------
    def _ensure_reader(self) -> None:
        loop = asyncio.get_running_loop()
        if self._reader is not None and self._loop is loop and not self._reader.done():
            return
        other_loop = self._loop is not None and self._loop is not loop and not self._loop.is_closed()
        if other_loop and self._reader is not None and not self._reader.done():
            raise RuntimeError("this AsyncLLM is serving another running event loop")
        self.client.check_alive()
        self._loop = loop
        self._reader = loop.create_task(self._read_outputs(), name="rollout-output-reader")

    async def _read_outputs(self) -> None:
        sock = zmq.asyncio.Socket.shadow(self.client.output.underlying)
        try:
            while True:
                if not await sock.poll(self._liveness_ms):
                    self.client.check_alive()
                    continue
                for msg in self.client.recv(0):  # drain what is queued, without blocking
                    self._dispatch(msg)
                self.client.check_alive()  # a failure reported after those messages
        except asyncio.CancelledError:
            raise
        except BaseException as e:
            err = e if isinstance(e, EngineDeadError) else EngineDeadError(f"output reader failed: {e!r}")
            if not self.client.is_dead:
                with contextlib.suppress(EngineDeadError):
                    self.client.mark_dead(err)
            self._fail_all(err)

    def _dispatch(self, msg: object) -> None:
        if isinstance(msg, Outputs):
            for delta in msg.deltas:
                stream = self._streams.get(delta.request_id)
                if stream is None:
                    continue
                if stream.orphaned:
                    if delta.finished:
                        del self._streams[delta.request_id]
                    continue
                stream.acc.apply(delta)
                stream.event.set()
            for rid, i, token, logprob, version in msg.tokens.rows():
                stream = self._streams.get(rid)
                if stream is not None and not stream.orphaned:
                    stream.acc.add_token(i, token, logprob, version)
                    stream.event.set()
        elif isinstance(msg, ControlAck):
            fut = self._calls.get(msg.call_id)
            if fut is not None and not fut.done():
                try:
                    fut.set_result(ack_result(msg))
                except Exception as e:
                    fut.set_exception(e)
        elif isinstance(msg, RequestFailed):
            stream = self._streams.get(msg.request_id)
            if stream is not None and stream.orphaned:
                del self._streams[msg.request_id]
            elif stream is not None:
                cls = TypeError if msg.error_type == "TypeError" else ValueError
                stream.error = cls(msg.message)
                stream.event.set()

    def _fail_all(self, err: BaseException) -> None:
        for rid, stream in list(self._streams.items()):
            if stream.orphaned:
                del self._streams[rid]
            stream.error = err
            stream.event.set()
        for fut in self._calls.values():
            if not fut.done():
                fut.set_exception(err)

    def _send_quietly(self, msg: AbortRequests) -> None:
        with contextlib.suppress(EngineDeadError, zmq.ZMQError):  # dead: nothing left to abort
            self.client.send(msg)

    # ---- lifetime ---------------------------------------------------------------------------
    @property
    def is_running(self) -> bool:
        """Whether the core is alive (not failed, not shut down)."""
        try:
            self.client.check_alive()
        except EngineDeadError:
            return False
        return True

    def shutdown(self) -> None:
        """Stop the core process and remove its sockets (idempotent). Open streams and calls raise
        ``EngineDeadError``. It blocks until the core exits (up to seconds): on the event loop, use
        ``aclose``."""
        self._stop_reader()
        self.client.shutdown()

    async def aclose(self) -> None:
        """``shutdown`` for code on the event loop: open streams and calls fail at once, and the core
        is stopped in a worker thread while the loop goes on serving."""
        reader = self._stop_reader()
        if reader is not None and reader.get_loop() is asyncio.get_running_loop():
            await asyncio.wait([reader])  # it no longer polls the socket that is about to close
        await asyncio.to_thread(self.client.shutdown)

    def _stop_reader(self) -> asyncio.Task | None:
        """Cancel the output reader and fail open streams and calls; returns the reader."""
        reader = self._reader
        # From here on every send, call and new stream raises (aclose awaits below: other tasks run
        # meanwhile, and must neither register a stream no reader will answer nor start a reader on
        # sockets a worker thread is closing)
        with contextlib.suppress(EngineDeadError):
            self.client.mark_dead(EngineDeadError("the engine was shut down"))
        if self._loop is not None and not self._loop.is_closed():
            if reader is not None and not reader.done():
                reader.cancel()
            self._fail_all(EngineDeadError("the engine was shut down"))
        return reader

    def __enter__(self) -> AsyncLLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    async def __aenter__(self) -> AsyncLLM:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:  # lone surrogates
        return False
    return True
