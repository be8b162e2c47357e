"""What the OpenAI routes share: request -> ``SamplingParams``, collected samples, logprobs in OpenAI's
two formats, usage. Streamed text comes decoded from ``AsyncLLM``'s delta outputs (each one's new text,
held back where a stop string could still cut it)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rollout.outputs import RequestOutput
from rollout.samplers.params import SamplingParams
from rollout.server.errors import APIError, bad_value
from rollout.server.protocol import ChatCompletionRequest, CompletionRequest
from rollout.server.state import ServerState

LOGPROB_FLOOR = -9999.0
"""Logprobs below this (``-inf`` for tokens a processed distribution excludes) are sent as this: JSON
has no infinity."""

# Request fields copied into SamplingParams when set (same names on both sides).
_PASSTHROUGH = (
    "temperature", "top_p", "seed", "top_k", "min_p", "min_tokens", "ignore_eos", "stop_token_ids",
    "include_stop_str_in_output", "skip_special_tokens", "logprobs_mode", "presence_penalty",
    "frequency_penalty", "repetition_penalty", "logit_bias",
)  # fmt: skip


def check_unsupported(req: CompletionRequest | ChatCompletionRequest) -> None:
    """400 for OpenAI features this server does not implement, unless left at their neutral value."""
    if isinstance(req, CompletionRequest):
        if req.best_of is not None and req.best_of != (req.n or 1):
            raise APIError(400, "best_of is not supported (only best_of == n)", "best_of")
        if req.suffix:
            raise APIError(400, "suffix is not supported", "suffix")
    else:
        if req.tools:
            raise APIError(400, "tools are not supported", "tools")
        fmt = (req.response_format or {}).get("type", "text")
        if fmt != "text":
            raise APIError(400, f"response_format {fmt!r} is not supported (only 'text')", "response_format")


def check_counts(st: ServerState, num_prompts: int, n: int | None) -> int:
    """The request's n, checked against the per-request limits."""
    n = 1 if n is None else n
    if n < 1:
        raise APIError(400, f"n must be >= 1, got {n}", "n")
    cfg = st.config
    if num_prompts > cfg.max_prompts_per_request:
        raise APIError(
            400, f"{num_prompts} prompts; at most {cfg.max_prompts_per_request} per request", "prompt"
        )
    if num_prompts * n > cfg.max_sequences_per_request:
        raise APIError(
            400, f"{num_prompts} prompts x n={n} sequences; at most {cfg.max_sequences_per_request}", "n"
        )
    return n


def check_room(st: ServerState, prompt_len: int, max_tokens: int, param: str = "max_tokens") -> None:
    limit = st.max_total_tokens
    if prompt_len + max_tokens > limit:
        raise APIError(
            400,
            f"this engine holds {limit} tokens per sequence; the request asks for {prompt_len + max_tokens} "
            f"({prompt_len} in the prompt, {max_tokens} to generate)",
            param,
            "context_length_exceeded",
        )


def sampling_params(
    req: CompletionRequest | ChatCompletionRequest,
    n: int,
    max_tokens: int,
    logprobs: int | None,
    prompt_logprobs: int | None = None,
    max_tokens_field: str = "max_tokens",
) -> SamplingParams:
    """The engine's parameters for an OpenAI request; a 400 naming the request's field otherwise."""
    kw: dict[str, Any] = {"n": n, "max_tokens": max_tokens, "logprobs": logprobs}
    if prompt_logprobs is not None:
        kw["prompt_logprobs"] = prompt_logprobs
    for name in _PASSTHROUGH:
        value = getattr(req, name)
        if value is not None:
            kw[name] = value
    if req.stop is not None:
        kw["stop"] = [req.stop] if isinstance(req.stop, str) else req.stop
    logprobs_field = "top_logprobs" if isinstance(req, ChatCompletionRequest) else "logprobs"
    try:
        return SamplingParams(**kw)
    except (ValueError, TypeError) as e:
        raise bad_value(e, {"max_tokens": max_tokens_field, "logprobs": logprobs_field}) from None


def finite(lp: float) -> float:
    return lp if lp > LOGPROB_FLOOR else LOGPROB_FLOOR  # also maps nan (every comparison is False)


def last_version(versions: Sequence[int]) -> int | None:
    return versions[-1] if versions else None


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


@dataclass
class Sample:
    """One sample of a non-streamed response, accumulated from delta outputs."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] | None = None
    weight_versions: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    text_parts: list[str] | None = None  # the delta outputs' texts (None: no text)

    @property
    def text(self) -> str | None:
        return None if self.text_parts is None else "".join(self.text_parts)


@dataclass
class Collected:
    """All samples of one prompt."""

    samples: list[Sample]
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[dict[int, float] | None] | None = None

    @classmethod
    def new(cls, n: int) -> Collected:
        return cls([Sample() for _ in range(n)])

    def add(self, out: RequestOutput) -> None:
        for c in out.outputs:
            s = self.samples[c.index]
            s.token_ids.extend(c.token_ids)
            s.logprobs.extend(c.logprobs)
            if c.top_logprobs is not None:
                s.top_logprobs = (s.top_logprobs or []) + list(c.top_logprobs)
            s.weight_versions.extend(c.weight_versions)
            if c.text is not None:
                if s.text_parts is None:
                    s.text_parts = []
                s.text_parts.append(c.text)
            if c.finish_reason is not None:
                s.finish_reason, s.stop_reason = c.finish_reason, c.stop_reason
        if out.prompt_logprobs is not None:
            self.prompt_logprobs, self.prompt_top_logprobs = out.prompt_logprobs, out.prompt_top_logprobs

    @property
    def num_output_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.samples)


def completion_logprobs(
    st: ServerState,
    ids: Sequence[int],
    logprobs: Sequence[float | None],
    tops: Sequence[dict[int, float] | None] | None,
    offset: int,
) -> dict[str, Any]:
    """The legacy completions ``logprobs`` object; ``offset`` is the text offset of the first token.
    Each top-logprobs dict also holds the token itself (so it has up to k + 1 entries, as OpenAI's)."""
    tokens, token_lps, top_lps, offsets = [], [], [], []
    for i, (t, lp) in enumerate(zip(ids, logprobs, strict=True)):
        s = st.token_string(t)
        tokens.append(s)
        offsets.append(offset)
        offset += len(s)
        token_lps.append(None if lp is None else finite(lp))
        if lp is None:
            top_lps.append(None)
            continue
        top = {st.token_string(k): finite(v) for k, v in ((tops[i] or {}) if tops else {}).items()}
        top.setdefault(s, finite(lp))
        top_lps.append(top)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": top_lps, "text_offset": offsets}


def chat_logprobs(
    st: ServerState,
    ids: Sequence[int],
    logprobs: Sequence[float],
    tops: Sequence[dict[int, float]] | None,
    k: int,
) -> list[dict[str, Any]]:
    """The chat ``logprobs.content`` list: per token its text, logprob, UTF-8 bytes and top ``k``."""
    content = []
    for i, (t, lp) in enumerate(zip(ids, logprobs, strict=True)):
        s = st.token_string(t)
        top = []
        if tops is not None and k:
            ranked = sorted(tops[i].items(), key=lambda kv: -kv[1])[:k]
            top = [
                {
                    "token": st.token_string(a),
                    "logprob": finite(b),
                    "bytes": list(st.token_string(a).encode()),
                }
                for a, b in ranked
            ]
        content.append({"token": s, "logprob": finite(lp), "bytes": list(s.encode()), "top_logprobs": top})
    return content
