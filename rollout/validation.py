"""Input checks shared by the engine core and its clients, so a client can reject bad input before
anything is sent, with the same messages the in-process engine gives."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from rollout.samplers.params import SamplingParams


def check_prompt_ids(ids: Sequence[object], vocab_size: int, max_total_tokens: int) -> list[int]:
    """Validate a token-id prompt and return it as a list. Raises ValueError naming the bad value."""
    ids = list(ids)
    if not ids:
        raise ValueError("prompt is empty")
    # The common all-valid case in C-speed builtins; the loop below only runs to name a bad token.
    if not (set(map(type, ids)) == {int} and min(ids) >= 0 and max(ids) < vocab_size):
        for i, t in enumerate(ids):
            if not isinstance(t, int) or isinstance(t, bool):
                raise ValueError(f"prompt token {i} is {t!r}, not an int")
            if not 0 <= t < vocab_size:
                raise ValueError(f"prompt token {i} is {t}, outside the vocabulary [0, {vocab_size})")
    if len(ids) >= max_total_tokens:
        raise ValueError(
            f"prompt has {len(ids)} tokens; this engine holds {max_total_tokens} tokens per sequence "
            "(context length or KV cache) and needs room for at least one output token"
        )
    return ids  # type: ignore[return-value]


def prompt_to_ids(
    prompt: str | Sequence[int],
    encode: Callable[[str], list[int]] | None,
    vocab_size: int,
    max_total_tokens: int,
) -> tuple[list[int], str | None]:
    """Validate a prompt (text, encoded with ``encode``, or token ids); return (token ids, text or None)."""
    if isinstance(prompt, str):
        if encode is None:
            raise ValueError("text prompts need a tokenizer; this model has none: pass token ids")
        return check_prompt_ids(encode(prompt), vocab_size, max_total_tokens), prompt
    return check_prompt_ids(prompt, vocab_size, max_total_tokens), None


def check_params(params: object, vocab_size: int, has_tokenizer: bool) -> None:
    """Validate sampling params against the engine (the params validated their own fields)."""
    if not isinstance(params, SamplingParams):
        raise TypeError(f"sampling params must be SamplingParams, got {type(params).__name__}")
    if params.stop and not has_tokenizer:
        raise ValueError(f"stop={params.stop!r} needs a tokenizer; this model has none")
    for t in params.stop_token_ids:
        if t >= vocab_size:
            raise ValueError(f"stop_token_ids has {t}, outside the vocabulary [0, {vocab_size})")
    for t, _ in params.logit_bias:
        if t >= vocab_size:
            raise ValueError(f"logit_bias has token {t}, outside the vocabulary [0, {vocab_size})")
