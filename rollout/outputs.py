"""What the engine returns to callers."""

from __future__ import annotations

from collections.abc import Iterator
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


@dataclass
class SampleDelta:
    """What one sample gained in one engine step (or at abort). Lists hold only the new tokens, so a
    step's outputs cost O(new tokens) to build, send and apply."""

    index: int  # which of the n samples
    token_ids: list[int]  # tokens sampled since the previous delta of this sample
    logprobs: list[float]  # their logprobs
    top_logprobs: list[dict[int, float]] | None  # their top-k dicts, when params.logprobs = k > 0
    weight_versions: list[int]  # the weight version that produced each new token
    finish_reason: str | None  # set in the sample's last delta: "stop" | "length" | "abort"
    stop_reason: int | str | None  # the stop token id or stop string, in the last delta
    text: str | None  # the full output text, in the last delta, when detokenized
    num_cached_tokens: int  # prompt tokens this sample took from the prefix cache (so far)
    num_preemptions: int  # times this sample was preempted (so far)


@dataclass
class RequestDelta:
    """What one prompt (all its samples) gained in one engine step. Samples with nothing new are left
    out. ``prompt_logprobs`` come once, in the first delta after the prompt was computed (or in the
    abort delta); ``prompt_token_ids`` come once, in the first delta, only for text prompts (the
    engine tokenized them; a client that sent ids already knows them)."""

    request_id: str
    samples: list[SampleDelta]
    finished: bool  # every sample has finished: this is the prompt's last delta
    prompt_token_ids: list[int] | None = None
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[dict[int, float] | None] | None = None


@dataclass
class NewTokens:
    """The common case of a streaming step, in columns: entry j says that sample ``indexes[j]`` of
    prompt ``request_ids[j]`` gained the one token ``token_ids[j]`` (logprob ``logprobs[j]``, weight
    version ``weight_versions[j]``), did not finish, and has nothing else to report. Everything else
    travels as ``RequestDelta``s. Columns cost a few list appends per token to build and are packed
    by msgpack in C."""

    request_ids: list[str] = field(default_factory=list)
    indexes: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    weight_versions: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.request_ids)

    def rows(self) -> Iterator[tuple[str, int, int, float, int]]:
        """Entry by entry: (request id, sample index, token id, logprob, weight version)."""
        return zip(
            self.request_ids, self.indexes, self.token_ids, self.logprobs, self.weight_versions, strict=True
        )
