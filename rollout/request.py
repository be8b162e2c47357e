"""The engine's internal state of one sequence being generated."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from rollout.samplers.params import SamplingParams

if TYPE_CHECKING:
    from rollout.detokenizer import StopScan


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued, or preempted and waiting to recompute
    RUNNING = "running"  # holds KV blocks and is scheduled each step
    FINISHED = "finished"  # stopped, hit a length limit, or aborted; blocks returned


@dataclass(eq=False, slots=True)
class Request:
    """One sequence: a prompt and the tokens sampled after it. An ``n``-sample prompt becomes ``n``
    requests that share the prompt (and its KV blocks through the prefix cache)."""

    request_id: str  # unique within the engine
    prompt_token_ids: list[int]  # the prompt, validated
    params: SamplingParams  # how to sample (its n is handled by the caller)
    seed: int  # counter-RNG seed: the user's seed, or a random one drawn at admission
    eos_token_ids: frozenset[int]  # stop tokens of the model, unless params.ignore_eos
    max_total_tokens: int  # prompt + output may not exceed this (context or cache limit)
    arrival: int  # admission order (FIFO fairness, preemption picks the newest)
    group_id: str  # the caller's request id of the prompt this sample belongs to
    leader: Request | None = None  # sibling whose prompt prefill this one waits for (prefix sharing)

    token_ids: list[int] = field(init=False)  # prompt + output so far
    output_logprobs: list[float] = field(default_factory=list)  # sampled token's logprob, per output token
    output_top_logprobs: list[dict[int, float]] = field(default_factory=list)  # when params.logprobs
    output_versions: list[int] = field(default_factory=list)  # weight version that produced each token
    prompt_logprobs: list[float | None] = field(default_factory=list)  # when params.prompt_logprobs
    prompt_top_logprobs: list[dict[int, float] | None] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose KV is in the cache (or queued on the device)
    # Tokens sampled by a step still running on the device (overlapped loop): the scheduler counts
    # them as known tokens (placeholders) and they are appended once the step's results are read.
    num_pending: int = 0
    num_cached_tokens: int = -1  # prompt tokens served by the prefix cache at first admission (-1: not yet)
    block_ids: list[int] = field(default_factory=list)  # KV blocks in sequence order
    block_hashes: list[bytes] = field(default_factory=list)  # chained hash of each full block of token_ids
    num_preemptions: int = 0
    cacheable: bool = True  # False while its KV holds positions computed under older weights
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    text: str = ""  # detokenized output (only when a tokenizer is present and detokenize is on)
    stop_scan: StopScan | None = None  # the Detokenizer's incremental text for stop strings
    sampling_values: tuple | None = None  # the model runner's RowValues (cached; see samplers.tensors)

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids) :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def in_prefill(self) -> bool:
        """True until the whole prompt is in the KV cache."""
        return self.num_computed_tokens < len(self.prompt_token_ids)
