"""What the engine returns to callers."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    """One sample of a prompt."""

    index: int  # which of the n samples
    token_ids: list[int]  # output tokens (the stop token included when it ended the sample)
    logprobs: list[float]  # per output token: the sampled token's logprob (params.logprobs_mode)
    top_logprobs: list[dict[int, float]] | None  # per output token, when params.logprobs = k > 0
    weight_versions: list[int]  # per output token: the weight version that produced it
    finish_reason: str | None  # "stop" | "length" | "abort"; None while running
    stop_reason: int | str | None = None  # the stop token id or stop string that matched
    text: str | None = None  # detokenized output when a tokenizer is present
    num_cached_tokens: int = 0  # prompt tokens this sample took from the prefix cache
    num_preemptions: int = 0  # times this sample was preempted and recomputed

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """All samples of one prompt. ``finished`` once every sample has a finish reason."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    prompt_logprobs: list[float | None] | None = None  # per prompt token (first is None), if requested
    prompt_top_logprobs: list[dict[int, float] | None] | None = None
    prompt: str | None = None  # the prompt text, when given as text
    finished: bool = False
    num_cached_tokens: int = field(default=0)  # prompt tokens served from the prefix cache, all samples
