"""Native routes: ``/generate`` (tokens in, tokens + logprobs + weight versions out, for RL clients),
``/tokenize``, ``/detokenize``, ``/health``, ``/version``, ``/metrics``.

``POST /generate`` body: ``{"prompt_token_ids": [...], "sampling_params": {...}, "stream": false,
"request_id": null}`` (``prompt`` text instead of ids works when the model has a tokenizer;
``sampling_params`` are ``SamplingParams`` fields). Response::

    {"request_id", "prompt_token_ids", "weight_version",     # the newest version in the outputs
     "outputs": [{"index", "token_ids", "logprobs", "top_logprobs",   # [[[id, logprob], ...] per token]
                  "weight_versions", "finish_reason", "stop_reason", "text"}],
     "prompt_logprobs", "prompt_top_logprobs"}                # with sampling_params.prompt_logprobs

Streamed (``stream: true``): server-sent events, each ``{"request_id", "outputs": [...new tokens (and
"text": their new text) of the samples that advanced...], "finished"}`` (``prompt_token_ids`` in the
first, prompt logprobs once), then ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

import rollout
from rollout.client import EngineDeadError
from rollout.outputs import CompletionOutput, RequestOutput
from rollout.samplers.params import SamplingParams
from rollout.server.errors import APIError, bad_value, json_response, parse_body, read_body
from rollout.server.metrics import CONTENT_TYPE
from rollout.server.openai_common import Collected, finite
from rollout.server.protocol import DetokenizeRequest, GenerateRequest, TokenizeRequest
from rollout.server.state import ServerState
from rollout.server.streaming import ClientGone, EventStream, sse, until_disconnect

router = APIRouter()  # needs the API key when one is set
open_router = APIRouter()  # /health, /version, /metrics: no key


def server(request: Request) -> ServerState:
    return request.app.state.server


def _tops(tops: Sequence[dict[int, float] | None] | None) -> list[Any] | None:
    if tops is None:
        return None
    return [None if t is None else [[k, finite(v)] for k, v in t.items()] for t in tops]


def _sample(c: CompletionOutput | Any, index: int) -> dict[str, Any]:
    return {
        "index": index,
        "token_ids": c.token_ids,
        "logprobs": [finite(x) for x in c.logprobs],
        "top_logprobs": _tops(c.top_logprobs),
        "weight_versions": c.weight_versions,
        "finish_reason": c.finish_reason,
        "stop_reason": c.stop_reason,
        "text": c.text,
    }


@router.post("/generate")
async def generate(request: Request) -> Response:
    st = server(request)
    req = parse_body(await read_body(request, st.config.max_request_bytes), GenerateRequest)
    if (req.prompt is None) == (req.prompt_token_ids is None):
        raise APIError(400, "give exactly one of prompt_token_ids / prompt", "prompt_token_ids")
    try:
        params = SamplingParams.from_dict(req.sampling_params)
    except (ValueError, TypeError) as e:
        raise bad_value(e) from None
    field = "prompt" if req.prompt is not None else "prompt_token_ids"
    ids = await st.encode(req.prompt, param=field) if req.prompt is not None else req.prompt_token_ids
    prompt = st.check_prompt(list(ids or []), field)
    if params.n > st.config.max_sequences_per_request:
        raise APIError(400, f"n={params.n}; at most {st.config.max_sequences_per_request}", "n")
    st.check_params(params)
    rid = req.request_id or f"gen-{uuid.uuid4().hex}"
    stream = st.generate(prompt, params, rid)
    if req.stream:
        return EventStream(_events(rid, prompt, stream))
    try:
        col = await until_disconnect(request.receive, _collect(stream, params.n))
    except ClientGone:
        return Response(status_code=499)
    versions = [v for s in col.samples for v in s.weight_versions]
    return json_response(
        {
            "request_id": rid,
            "prompt_token_ids": prompt,
            "weight_version": max(versions) if versions else None,
            "outputs": [_sample(s, i) for i, s in enumerate(col.samples)],
            "prompt_logprobs": None
            if col.prompt_logprobs is None
            else [None if x is None else finite(x) for x in col.prompt_logprobs],
            "prompt_top_logprobs": _tops(col.prompt_top_logprobs),
        }
    )


async def _collect(stream: AsyncIterator[RequestOutput], n: int) -> Collected:
    col = Collected.new(n)
    async for out in stream:
        col.add(out)
    return col


async def _events(rid: str, prompt: list[int], stream: AsyncIterator[RequestOutput]) -> AsyncIterator[bytes]:
    first = True
    async for out in stream:
        event: dict[str, Any] = {
            "request_id": rid,
            "outputs": [_sample(c, c.index) for c in out.outputs],
            "finished": out.finished,
        }
        if first:
            event["prompt_token_ids"] = prompt
            first = False
        if out.prompt_logprobs is not None:
            event["prompt_logprobs"] = [None if x is None else finite(x) for x in out.prompt_logprobs]
            event["prompt_top_logprobs"] = _tops(out.prompt_top_logprobs)
        yield sse(event)


@router.post("/tokenize")
async def tokenize(request: Request) -> Response:
    st = server(request)
    req = parse_body(await read_body(request, st.config.max_request_bytes), TokenizeRequest)
    st.check_model(req.model)
    if (req.prompt is None) == (req.messages is None):
        raise APIError(400, "give exactly one of prompt / messages", "prompt")
    if req.messages is not None:
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        text = await st.render_chat(messages, req.add_generation_prompt)
        ids = await st.encode(text, add_special_tokens=False, param="messages")
    else:
        ids = await st.encode(req.prompt or "", add_special_tokens=req.add_special_tokens)
    return json_response({"tokens": ids, "count": len(ids), "max_model_len": st.max_total_tokens})


@router.post("/detokenize")
async def detokenize(request: Request) -> Response:
    st = server(request)
    req = parse_body(await read_body(request, st.config.max_request_bytes), DetokenizeRequest)
    st.check_model(req.model)
    st.need_tokenizer("detokenize", "tokens")
    vocab = st.llm.info.vocab_size
    for i, t in enumerate(req.tokens):
        if not 0 <= t < vocab:
            raise APIError(400, f"tokens[{i}] is {t}, outside the vocabulary [0, {vocab})", "tokens")
    return json_response({"prompt": st.decode(req.tokens, req.skip_special_tokens)})


@open_router.get("/health")
async def health(request: Request) -> Response:
    st = server(request)
    if not st.llm.is_running:
        raise APIError(503, "the engine is not running")
    return json_response({"status": "ok"})


@open_router.get("/version")
async def version(request: Request) -> Response:
    return json_response({"version": rollout.__version__})


@open_router.get("/metrics")
async def metrics(request: Request) -> Response:
    st = server(request)
    try:
        state = await asyncio.wait_for(st.llm.get_state(), st.config.state_timeout_s)
    except (asyncio.TimeoutError, EngineDeadError):
        state = None  # the server's own figures still come
    return Response(st.metrics.render(state), media_type=CONTENT_TYPE)
