"""Client-disconnect handling and server-sent events.

A request whose client goes away must stop generating at once and free its KV blocks. Leaving an
``AsyncLLM.generate`` loop (cancellation included) aborts its request, so both helpers here turn a
disconnect into cancellation: ``EventStream`` (streaming responses) cancels the task pumping events
and closes the event iterator; ``until_disconnect`` (whole responses) cancels the work. Both listen
for ``http.disconnect`` on the ASGI receive channel instead of waiting for a failed write: a request
queued behind others, or paused, writes nothing for a long time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from rollout.client import EngineDeadError
from rollout.server.errors import APIError, engine_dead

T = TypeVar("T")

DONE = b"data: [DONE]\n\n"


def sse(obj: Any) -> bytes:
    """One server-sent event carrying ``obj`` as JSON."""
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


class ClientGone(Exception):
    """The client disconnected before its response was ready."""


async def wait_for_disconnect(receive: Receive) -> None:
    """Return once the client disconnected (the request body must have been read already)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class EventStream(Response):
    """A ``text/event-stream`` response over an async iterator of encoded events, ended by ``[DONE]``.
    An ``APIError`` raised by the iterator becomes its error event (``EngineDeadError``: a 503) before
    ``[DONE]``. When the client disconnects, the iterator is cancelled where it waits and closed,
    aborting the requests behind it."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes]) -> None:
        self.events = events
        self.status_code = 200
        self.background = None
        self.init_headers({"cache-control": "no-cache", "x-accel-buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def pump() -> None:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for chunk in _ended(self.events):
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        pump_task = asyncio.ensure_future(pump())
        listener = asyncio.ensure_future(wait_for_disconnect(receive))
        try:
            await asyncio.wait({pump_task, listener}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (pump_task, listener):
                task.cancel()
            await asyncio.gather(pump_task, listener, return_exceptions=True)
            aclose = getattr(self.events, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()
        if pump_task.done() and not pump_task.cancelled() and pump_task.exception() is not None:
            raise pump_task.exception()  # type: ignore[misc]


async def _ended(events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """``events``, then the error event of what ended them early (if anything), then ``[DONE]``."""
    try:
        async for chunk in events:
            yield chunk
    except APIError as e:
        yield sse(e.body())
    except EngineDeadError as e:
        yield sse(engine_dead(e).body())
    yield DONE


async def until_disconnect(receive: Receive, work: Awaitable[T]) -> T:
    """Await ``work``; if the client disconnects first, cancel it and raise ``ClientGone``."""
    task = asyncio.ensure_future(work)
    listener = asyncio.ensure_future(wait_for_disconnect(receive))
    try:
        await asyncio.wait({task, listener}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        raise ClientGone()
    finally:
        listener.cancel()
        if not task.done():
            task.cancel()
        await asyncio.gather(task, listener, return_exceptions=True)


_END = object()


async def merge(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Items of several async iterators as they come, tagged with the iterator's index. Closing the
    merged iterator (or an error in one of them) cancels and closes all of them."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield 0, item
        return
    queue: asyncio.Queue[tuple[int, Any, BaseException | None]] = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                queue.put_nowait((i, item, None))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            queue.put_nowait((i, _END, e))
            return
        queue.put_nowait((i, _END, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item, err = await queue.get()
            if err is not None:
                raise err
            if item is _END:
                remaining -= 1
                continue
            yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
