"""What one server holds (kept on ``app.state.server``; nothing module-global), and the engine-side
helpers every route uses: tokenizing off the event loop, prompt checks, tracked generation."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from rollout.async_llm import AsyncLLM
from rollout.outputs import RequestOutput
from rollout.samplers.params import SamplingParams
from rollout.server.errors import APIError, bad_value
from rollout.server.metrics import ServerMetrics
from rollout.validation import check_params, check_prompt_ids

INLINE_TOKENIZE_CHARS = 16_384
"""Texts longer than this are tokenized in a worker thread, so the event loop keeps serving."""


@dataclass(frozen=True)
class ServerConfig:
    """How the HTTP server behaves (the engine's own configuration is the ``AsyncLLM``'s)."""

    model_name: str  # the name clients pass as ``model`` (and /v1/models lists)
    api_key: str | None = None  # when set, /v1/*, /generate, /tokenize, /detokenize need it (Bearer)
    enable_admin: bool = False  # mount the /admin/* control routes
    admin_key: str | None = None  # the Bearer key of the admin routes (required with enable_admin)
    max_request_bytes: int = 32 << 20  # larger bodies get a 413
    max_prompts_per_request: int = 1024  # prompts in one /v1/completions request
    max_sequences_per_request: int = 4096  # prompts x n in one request
    state_timeout_s: float = 10.0  # how long /metrics and /health wait for the engine's state

    def __post_init__(self) -> None:
        if self.enable_admin and not self.admin_key:
            raise ValueError("enable_admin needs an admin_key (--admin-key or ROLLOUT_ADMIN_KEY)")
        if self.max_request_bytes < 1024:
            raise ValueError(f"max_request_bytes must be >= 1024, got {self.max_request_bytes}")


@dataclass
class ServerState:
    """One server: its engine, tokenizer (None when the model has none) and metrics."""

    config: ServerConfig
    llm: AsyncLLM
    tokenizer: Any | None
    metrics: ServerMetrics
    created: int = field(default_factory=lambda: int(time.time()))
    token_strings: dict[int, str] = field(default_factory=dict)  # id -> decoded text, filled lazily

    @property
    def max_total_tokens(self) -> int:
        return self.llm.info.max_total_tokens

    def check_model(self, model: str | None) -> None:
        """404 when the request names another model (no model named: this one)."""
        if model is not None and model != self.config.model_name:
            raise APIError(404, f"the model {model!r} does not exist", "model", "model_not_found")

    def need_tokenizer(self, what: str, param: str | None = None) -> Any:
        if self.tokenizer is None:
            raise APIError(400, f"{what} needs a tokenizer; this model has none: send token ids", param)
        return self.tokenizer

    async def encode(self, text: str, add_special_tokens: bool = True, param: str = "prompt") -> list[int]:
        """Token ids of a text, as the engine would encode it."""
        tok = self.need_tokenizer("a text prompt", param)
        if len(text) <= INLINE_TOKENIZE_CHARS:
            return list(tok(text, add_special_tokens=add_special_tokens)["input_ids"])
        ids = await asyncio.to_thread(tok, text, add_special_tokens=add_special_tokens)
        return list(ids["input_ids"])

    async def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        tok = self.need_tokenizer("chat", "messages")
        if getattr(tok, "chat_template", None) is None:
            raise APIError(400, "this model's tokenizer has no chat template", "messages")
        size = sum(len(m["content"]) for m in messages)
        kwargs = {"tokenize": False, "add_generation_prompt": add_generation_prompt}
        try:
            if size <= INLINE_TOKENIZE_CHARS:
                return tok.apply_chat_template(messages, **kwargs)
            return await asyncio.to_thread(tok.apply_chat_template, messages, **kwargs)
        except Exception as e:  # a template may raise on roles or orders it does not accept
            raise APIError(400, f"the chat template refused the messages: {e}", "messages") from None

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_string(self, token_id: int) -> str:
        """A token's own text (for logprobs), cached per id."""
        s = self.token_strings.get(token_id)
        if s is None:
            s = self.decode([token_id], False) if self.tokenizer is not None else f"token_id:{token_id}"
            self.token_strings[token_id] = s
        return s

    def check_prompt(self, ids: list[int], param: str = "prompt") -> list[int]:
        """Validate token ids against the engine (cheap length check first: huge prompts fail fast)."""
        limit = self.max_total_tokens
        if len(ids) >= limit:
            raise APIError(
                400,
                f"the prompt has {len(ids)} tokens; this engine holds {limit} tokens per sequence "
                "and needs room for at least one output token",
                param,
                "context_length_exceeded",
            )
        try:
            return check_prompt_ids(ids, self.llm.info.vocab_size, limit)
        except ValueError as e:
            raise APIError(400, str(e), param) from None

    def check_params(self, params: SamplingParams, fields: dict[str, str] | None = None) -> None:
        try:
            check_params(params, self.llm.info.vocab_size, self.llm.info.has_tokenizer)
        except (ValueError, TypeError) as e:
            raise bad_value(e, fields) from None

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """Delta outputs of one validated prompt, recording latency and token metrics. Leaving the
        loop early aborts the request (``AsyncLLM.generate``'s contract)."""
        m = self.metrics
        start = time.perf_counter()
        last: float | None = None
        finished = 0  # samples whose finish was seen
        refused = False
        m.in_flight.inc()
        m.prompt_tokens.inc(len(prompt_ids))
        try:
            async for out in self.llm.generate(prompt_ids, params, request_id, output_kind="delta"):
                last = m.observe(out, time.perf_counter(), start, last)
                finished += sum(c.finish_reason is not None for c in out.outputs)
                yield out
            m.e2e.observe(time.perf_counter() - start)
        except (ValueError, TypeError) as e:
            refused = True
            raise bad_value(e) from None
        finally:
            m.in_flight.dec()
            if not refused and finished < params.n:  # left early (a client gone): the rest aborted
                m.finished.labels("abort").inc(params.n - finished)
