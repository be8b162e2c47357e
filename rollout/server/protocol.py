"""Request bodies of the HTTP server (pydantic models), parsed strictly from JSON.

Bodies are validated with ``model_validate_json(..., strict=True)``: no string-to-number coercion,
no bools as ints. Unknown fields are ignored on the OpenAI routes (clients and eval harnesses send
fields this server has no use for) and refused on the native and admin routes. OpenAI fields that
would change results but are not supported (tools, response formats, ...) are accepted only at
their neutral values; ``openai_common.check_unsupported`` refuses anything else with a 400.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt

MAX_ID_LENGTH = 256
"""Longest client-chosen request id."""


class _OpenAIBody(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _StrictBody(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_OpenAIBody):
    include_usage: bool | None = False  # one last chunk with the usage and no choices


class _SamplingFields(_OpenAIBody):
    """Fields shared by /v1/completions and /v1/chat/completions (OpenAI's, then extensions)."""

    model: str | None = None
    n: StrictInt | None = 1
    temperature: float | None = None  # None: 1.0
    top_p: float | None = None  # None: 1.0
    seed: StrictInt | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float | None = None  # in [-2, 2]
    frequency_penalty: float | None = None  # in [-2, 2]
    logit_bias: dict[str, float] | None = None  # {"token id": bias in [-100, 100]}
    # extensions (vLLM's names where vLLM has them)
    top_k: StrictInt | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None  # in [1e-6, 1e6]; 1 = off
    min_tokens: StrictInt | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[StrictInt] | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    logprobs_mode: Literal["raw", "processed"] | None = None
    return_token_ids: bool | None = True  # prompt_token_ids / token_ids on every choice


class CompletionRequest(_SamplingFields):
    """``POST /v1/completions``. ``prompt`` is a text, a list of token ids, or a list of either."""

    prompt: str | list[StrictInt] | list[str] | list[list[StrictInt]]
    max_tokens: StrictInt | None = 16
    logprobs: StrictInt | None = None  # top logprobs per token (the sampled token's always comes)
    echo: bool | None = False  # prepend the prompt (and its logprobs, with ``logprobs``)
    best_of: StrictInt | None = None  # only best_of == n (or unset)
    suffix: str | None = None  # not supported (refused when set)


class TextPart(_OpenAIBody):
    type: Literal["text"]
    text: str


class ChatMessage(_OpenAIBody):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        """The message's content as one string (text parts joined)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingFields):
    """``POST /v1/chat/completions``: the tokenizer's chat template renders ``messages``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = None  # None: the rest of the context
    max_completion_tokens: StrictInt | None = None  # OpenAI's newer name; wins over max_tokens
    logprobs: bool | None = False
    top_logprobs: StrictInt | None = None
    add_generation_prompt: bool | None = True
    # not supported (refused unless empty / "text")
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None


class GenerateRequest(_StrictBody):
    """``POST /generate``: one prompt (token ids, or text when the model has a tokenizer) and
    ``SamplingParams`` fields as a mapping. ``request_id`` lets the client abort it through the
    admin routes; it must not be in use."""

    prompt_token_ids: list[StrictInt] | None = None
    prompt: str | None = None
    sampling_params: dict[str, Any] = Field(default_factory=dict)
    stream: bool = False
    request_id: str | None = Field(default=None, min_length=1, max_length=MAX_ID_LENGTH)


class TokenizeRequest(_StrictBody):
    """``POST /tokenize``: a text (``prompt``) or chat ``messages``, not both."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_StrictBody):
    """``POST /detokenize``."""

    model: str | None = None
    tokens: list[StrictInt]
    skip_special_tokens: bool = False


# ---- admin ------------------------------------------------------------------------------------
class PauseBody(_StrictBody):
    mode: Literal["abort", "wait", "keep"] = "abort"


class AbortBody(_StrictBody):
    request_ids: list[str] = Field(min_length=1)


class UpdateFromDiskBody(_StrictBody):
    path: str = Field(min_length=1)
    version: StrictInt | None = None
    pause: Literal["abort", "wait", "keep"] | None = None


class SleepBody(_StrictBody):
    level: StrictInt = 1
    pause: Literal["abort", "wait", "keep"] | None = None


class WakeUpBody(_StrictBody):
    tags: list[str] | None = None


class EmptyBody(_StrictBody):
    pass


class KwargsBody(BaseModel):
    """Free-form keyword arguments of a control call (weight-group calls: their fields belong to the
    weight-sync transport, which validates them)."""

    model_config = ConfigDict(extra="allow")
