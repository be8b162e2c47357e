"""OpenAI-compatible routes: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``.

Besides OpenAI's fields, every choice carries ``weight_version`` (the version of the weights that
produced its last token) and, unless the request sets ``return_token_ids: false``,
``prompt_token_ids`` and ``token_ids`` (streamed: the new ids of each chunk, the prompt's once).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from rollout.outputs import RequestOutput
from rollout.server.errors import APIError, json_response, parse_body, read_body
from rollout.server.openai_common import (
    Collected,
    chat_logprobs,
    check_counts,
    check_room,
    check_unsupported,
    completion_logprobs,
    last_version,
    sampling_params,
    usage,
)
from rollout.server.protocol import ChatCompletionRequest, CompletionRequest
from rollout.server.state import ServerState
from rollout.server.streaming import ClientGone, EventStream, merge, sse, until_disconnect


def server(request: Request) -> ServerState:
    return request.app.state.server


router = APIRouter()


@router.get("/v1/models")
async def list_models(request: Request) -> Response:
    st = server(request)
    card = {
        "id": st.config.model_name,
        "object": "model",
        "created": st.created,
        "owned_by": "rollout-engine",
        "max_model_len": st.max_total_tokens,
    }
    return json_response({"object": "list", "data": [card]})


# ---- /v1/completions --------------------------------------------------------------------------
@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    st = server(request)
    req = parse_body(await read_body(request, st.config.max_request_bytes), CompletionRequest)
    st.check_model(req.model)
    check_unsupported(req)
    texts, prompts = await _prompts(st, req.prompt)
    n = check_counts(st, len(prompts), req.n)
    max_tokens = 16 if req.max_tokens is None else req.max_tokens
    echo, k = bool(req.echo), req.logprobs
    drop_output = False  # max_tokens=0 with echo: score the prompt, generate nothing
    if max_tokens == 0 and echo:
        max_tokens, drop_output = 1, True
    check_room(st, max(len(p) for p in prompts), max_tokens)
    params = sampling_params(req, n, max_tokens, k, prompt_logprobs=k if echo and k is not None else None)
    st.check_params(params)
    rid = f"cmpl-{uuid.uuid4().hex}"
    streams = [st.generate(p, params, f"{rid}-{i}") for i, p in enumerate(prompts)]
    ctx = _Completion(st, req, rid, texts, prompts, n, echo, k, drop_output, params.skip_special_tokens)
    if req.stream:
        return EventStream(ctx.events(streams))
    try:
        collected = await until_disconnect(request.receive, _collect(streams, n))
    except ClientGone:
        return Response(status_code=499)
    return json_response(ctx.response(collected))


async def _prompts(st: ServerState, prompt: Any) -> tuple[list[str | None], list[list[int]]]:
    """The request's prompts as (text or None, validated token ids)."""
    if isinstance(prompt, str):
        items: list[Any] = [prompt]
    elif not prompt:
        raise APIError(400, "prompt is empty", "prompt")
    elif isinstance(prompt[0], int):
        items = [prompt]
    else:
        items = list(prompt)
    if len(items) > st.config.max_prompts_per_request:
        raise APIError(400, f"{len(items)} prompts; at most {st.config.max_prompts_per_request}", "prompt")
    texts: list[str | None] = []
    ids: list[list[int]] = []
    for p in items:
        texts.append(p if isinstance(p, str) else None)
        ids.append(st.check_prompt(await st.encode(p) if isinstance(p, str) else list(p)))
    return texts, ids


async def _collect(streams: list[AsyncIterator[RequestOutput]], n: int) -> list[Collected]:
    async def one(stream: AsyncIterator[RequestOutput]) -> Collected:
        c = Collected.new(n)
        async for out in stream:
            c.add(out)
        return c

    tasks = [asyncio.ensure_future(one(s)) for s in streams]
    try:
        return list(await asyncio.gather(*tasks))
    finally:  # one prompt failed, or the client left: stop the others too
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class _Completion:
    """Builds one completions response (whole or as events) from the engine's outputs."""

    def __init__(
        self,
        st: ServerState,
        req: CompletionRequest,
        rid: str,
        texts: list[str | None],
        prompts: list[list[int]],
        n: int,
        echo: bool,
        k: int | None,
        drop_output: bool,
        skip_special_tokens: bool,
    ) -> None:
        self.st, self.req, self.rid, self.n = st, req, rid, n
        self.texts, self.prompts, self.echo, self.k = texts, prompts, echo, k
        self.drop_output, self.skip = drop_output, skip_special_tokens
        self.created = int(time.time())
        self.ids = req.return_token_ids is not False

    def prompt_text(self, i: int) -> str:
        text = self.texts[i]
        return text if text is not None else self.st.decode(self.prompts[i], self.skip)

    def response(self, collected: list[Collected]) -> dict[str, Any]:
        choices = []
        for i, col in enumerate(collected):
            for j, s in enumerate(col.samples):
                ids, lps, tops = s.token_ids, s.logprobs, s.top_logprobs
                if self.drop_output:
                    ids, lps, tops = [], [], None
                text = (s.text or "") if not self.drop_output else ""
                head = self.prompt_text(i) if self.echo else ""
                logprobs = None
                if self.k is not None:
                    p_ids: list[int] = self.prompts[i] if self.echo else []
                    p_lps: list[Any] = (col.prompt_logprobs or [None] * len(p_ids)) if self.echo else []
                    p_tops: list[Any] = (col.prompt_top_logprobs or [None] * len(p_ids)) if self.echo else []
                    all_tops = p_tops + (tops if tops is not None else [None] * len(ids))
                    logprobs = completion_logprobs(self.st, p_ids + ids, p_lps + lps, all_tops, 0)
                choice: dict[str, Any] = {
                    "index": i * self.n + j,
                    "text": head + text,
                    "logprobs": logprobs,
                    "finish_reason": s.finish_reason,
                    "stop_reason": s.stop_reason,
                    "weight_version": last_version(s.weight_versions),
                }
                if self.ids:
                    choice["prompt_token_ids"], choice["token_ids"] = self.prompts[i], ids
                choices.append(choice)
        completion_tokens = 0 if self.drop_output else sum(c.num_output_tokens for c in collected)
        return {
            "id": self.rid,
            "object": "text_completion",
            "created": self.created,
            "model": self.st.config.model_name,
            "choices": choices,
            "usage": usage(sum(len(p) for p in self.prompts), completion_tokens),
        }

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.rid,
            "object": "text_completion",
            "created": self.created,
            "model": self.st.config.model_name,
            "choices": choices,
        }

    async def events(self, streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[bytes]:
        started: set[int] = set()
        prompt_lps: dict[int, RequestOutput] = {}
        text_offsets: dict[int, int] = {}  # per choice: where its next token's text starts
        completion_tokens = 0
        async for i, out in merge(streams):
            if out.prompt_logprobs is not None:
                prompt_lps[i] = out
            for c in out.outputs:
                idx = i * self.n + c.index
                ids, lps, tops = c.token_ids, c.logprobs, c.top_logprobs
                if self.drop_output:
                    ids, lps, tops = [], [], None
                completion_tokens += len(ids)
                text = "" if self.drop_output else (c.text or "")
                p_ids: list[int] = []
                p_lps: list[Any] = []
                p_tops: list[Any] = []
                if idx not in started and self.echo:
                    text = self.prompt_text(i) + text
                    p_ids = self.prompts[i]
                    src = prompt_lps.get(i)
                    p_lps = (src.prompt_logprobs if src else None) or [None] * len(p_ids)
                    p_tops = (src.prompt_top_logprobs if src else None) or [None] * len(p_ids)
                logprobs = None
                if self.k is not None:
                    all_tops = p_tops + (list(tops) if tops is not None else [None] * len(ids))
                    start = text_offsets.get(idx, 0)
                    logprobs = completion_logprobs(self.st, p_ids + ids, p_lps + lps, all_tops, start)
                    if logprobs["tokens"]:
                        text_offsets[idx] = logprobs["text_offset"][-1] + len(logprobs["tokens"][-1])
                choice: dict[str, Any] = {
                    "index": idx,
                    "text": text,
                    "logprobs": logprobs,
                    "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason,
                    "weight_version": last_version(c.weight_versions),
                }
                if self.ids:
                    choice["token_ids"] = ids
                    if idx not in started:
                        choice["prompt_token_ids"] = self.prompts[i]
                started.add(idx)
                yield sse(self._chunk([choice]))
        if self.req.stream_options is not None and self.req.stream_options.include_usage:
            chunk = self._chunk([])
            chunk["usage"] = usage(sum(len(p) for p in self.prompts), completion_tokens)
            yield sse(chunk)


# ---- /v1/chat/completions ---------------------------------------------------------------------
@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    st = server(request)
    req = parse_body(await read_body(request, st.config.max_request_bytes), ChatCompletionRequest)
    st.check_model(req.model)
    check_unsupported(req)
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    messages = [{"role": m.role, "content": m.text()} for m in req.messages]
    rendered = await st.render_chat(messages, req.add_generation_prompt is not False)
    prompt = st.check_prompt(
        await st.encode(rendered, add_special_tokens=False, param="messages"), "messages"
    )
    n = check_counts(st, 1, req.n)
    field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if max_tokens is None:
        max_tokens = st.max_total_tokens - len(prompt)
    check_room(st, len(prompt), max_tokens, field)
    k = (req.top_logprobs or 0) if req.logprobs else None
    params = sampling_params(req, n, max_tokens, k, max_tokens_field=field)
    st.check_params(params, {"max_tokens": field, "logprobs": "top_logprobs"})
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    stream = st.generate(prompt, params, rid)
    chat = _Chat(st, req, rid, prompt, n, k)
    if req.stream:
        return EventStream(chat.events(stream))
    try:
        (collected,) = await until_disconnect(request.receive, _collect([stream], n))
    except ClientGone:
        return Response(status_code=499)
    return json_response(chat.response(collected))


class _Chat:
    def __init__(
        self,
        st: ServerState,
        req: ChatCompletionRequest,
        rid: str,
        prompt: list[int],
        n: int,
        k: int | None,
    ) -> None:
        self.st, self.req, self.rid, self.prompt, self.n, self.k = st, req, rid, prompt, n, k
        self.created = int(time.time())
        self.ids = req.return_token_ids is not False

    def _envelope(self, obj: str) -> dict[str, Any]:
        return {"id": self.rid, "object": obj, "created": self.created, "model": self.st.config.model_name}

    def response(self, col: Collected) -> dict[str, Any]:
        choices = []
        for j, s in enumerate(col.samples):
            logprobs = None
            if self.k is not None:
                logprobs = {
                    "content": chat_logprobs(self.st, s.token_ids, s.logprobs, s.top_logprobs, self.k)
                }
            choice: dict[str, Any] = {
                "index": j,
                "message": {"role": "assistant", "content": s.text or ""},
                "logprobs": logprobs,
                "finish_reason": s.finish_reason,
                "stop_reason": s.stop_reason,
                "weight_version": last_version(s.weight_versions),
            }
            if self.ids:
                choice["prompt_token_ids"], choice["token_ids"] = self.prompt, s.token_ids
            choices.append(choice)
        body = self._envelope("chat.completion")
        body["choices"] = choices
        body["usage"] = usage(len(self.prompt), col.num_output_tokens)
        return body

    def _chunk(self, choice: dict[str, Any]) -> bytes:
        body = self._envelope("chat.completion.chunk")
        body["choices"] = [choice]
        return sse(body)

    async def events(self, stream: AsyncIterator[RequestOutput]) -> AsyncIterator[bytes]:
        completion_tokens = 0
        for j in range(self.n):
            delta = {"role": "assistant", "content": ""}
            first: dict[str, Any] = {"index": j, "delta": delta, "logprobs": None, "finish_reason": None}
            if self.ids:
                first["prompt_token_ids"] = self.prompt
            yield self._chunk(first)
        async for out in stream:
            for c in out.outputs:
                completion_tokens += len(c.token_ids)
                text = c.text or ""
                logprobs = None
                if self.k is not None:
                    logprobs = {
                        "content": chat_logprobs(self.st, c.token_ids, c.logprobs, c.top_logprobs, self.k)
                    }
                choice: dict[str, Any] = {
                    "index": c.index,
                    "delta": {"content": text} if text or c.finish_reason is None else {},
                    "logprobs": logprobs,
                    "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason,
                    "weight_version": last_version(c.weight_versions),
                }
                if self.ids:
                    choice["token_ids"] = c.token_ids
                yield self._chunk(choice)
        if self.req.stream_options is not None and self.req.stream_options.include_usage:
            body = self._envelope("chat.completion.chunk")
            body["choices"] = []
            body["usage"] = usage(len(self.prompt), completion_tokens)
            yield sse(body)
