"""Client-side accumulation of a prompt's streamed deltas into ``RequestOutput``s.

The core sends each prompt's new tokens per step (``RequestDelta``); an ``OutputAccumulator`` appends
them (O(new tokens)) and hands the caller either what is new since the caller's previous output
(``output_kind="delta"``, O(new tokens)) or a snapshot of everything so far (``"cumulative"``, a copy:
O(tokens so far)). Several deltas that arrive before the caller asks are merged into one output.

Text: the core sends a sample's final text in its last delta. With a ``new_detokenizer``, each output
also carries the text of its tokens: in delta outputs the text new since the previous output, in
cumulative ones the text so far; both end at the core's final text (see ``IncrementalDetokenizer``).
It is decoded when the caller asks, so merged deltas are decoded once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from rollout.detokenizer import IncrementalDetokenizer
from rollout.outputs import CompletionOutput, RequestDelta, RequestOutput

OutputKind = Literal["delta", "cumulative"]
OUTPUT_KINDS = ("delta", "cumulative")


@dataclass
class _Sample:
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] | None = None
    weight_versions: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    text: str | None = None  # the core's final text, from the last delta
    num_cached_tokens: int = 0
    num_preemptions: int = 0
    emitted: int = 0  # tokens already handed out in delta outputs
    finish_emitted: bool = False
    detok: IncrementalDetokenizer | None = None  # the streamed text; None: only the final ``text``
    decoded: int = 0  # tokens ``detok`` has read


class OutputAccumulator:
    """The client's view of one prompt (all its samples)."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int] | None,
        prompt: str | None,
        n: int,
        wants_top_logprobs: bool,
        new_detokenizer: Callable[[], IncrementalDetokenizer] | None = None,
    ) -> None:
        """``new_detokenizer`` makes one sample's detokenizer; without it, outputs carry only the
        core's final text (in the last one)."""
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids  # None until the core reports a text prompt's ids
        self.prompt = prompt
        self.samples = [
            _Sample(
                top_logprobs=[] if wants_top_logprobs else None,
                detok=None if new_detokenizer is None else new_detokenizer(),
            )
            for _ in range(n)
        ]
        self.prompt_logprobs: list[float | None] | None = None
        self.prompt_top_logprobs: list[dict[int, float] | None] | None = None
        self.finished = False
        self._prompt_logprobs_emitted = False
        self._changed = False

    def apply(self, delta: RequestDelta) -> None:
        """Append one delta from the core."""
        for d in delta.samples:
            s = self.samples[d.index]
            s.token_ids.extend(d.token_ids)
            s.logprobs.extend(d.logprobs)
            if s.top_logprobs is not None and d.top_logprobs is not None:
                s.top_logprobs.extend(d.top_logprobs)
            s.weight_versions.extend(d.weight_versions)
            s.finish_reason, s.stop_reason = d.finish_reason, d.stop_reason
            if d.text is not None:
                s.text = d.text
            s.num_cached_tokens, s.num_preemptions = d.num_cached_tokens, d.num_preemptions
        if delta.prompt_token_ids is not None:
            self.prompt_token_ids = delta.prompt_token_ids
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs = delta.prompt_logprobs
            self.prompt_top_logprobs = delta.prompt_top_logprobs
        self.finished = self.finished or delta.finished
        self._changed = True

    def add_token(self, index: int, token_id: int, logprob: float, weight_version: int) -> None:
        """Append one token of sample ``index`` (an entry of ``NewTokens``: nothing else changed)."""
        s = self.samples[index]
        s.token_ids.append(token_id)
        s.logprobs.append(logprob)
        s.weight_versions.append(weight_version)
        self._changed = True

    def take(self, kind: OutputKind) -> RequestOutput | None:
        """The output to hand the caller now, or None when nothing changed since the last one."""
        if not self._changed:
            return None
        self._changed = False
        return self.delta() if kind == "delta" else self.cumulative()

    def cumulative(self) -> RequestOutput:
        """Everything so far (copied: later deltas do not change it)."""
        outputs = [
            CompletionOutput(
                index=i,
                token_ids=list(s.token_ids),
                logprobs=list(s.logprobs),
                top_logprobs=None if s.top_logprobs is None else list(s.top_logprobs),
                weight_versions=list(s.weight_versions),
                finish_reason=s.finish_reason,
                stop_reason=s.stop_reason,
                text=s.text if s.detok is None else self._text_so_far(s),
                num_cached_tokens=s.num_cached_tokens,
                num_preemptions=s.num_preemptions,
            )
            for i, s in enumerate(self.samples)
        ]
        return self._request_output(outputs, self.prompt_logprobs, self.prompt_top_logprobs)

    def delta(self) -> RequestOutput:
        """What is new since the previous ``delta()``: only samples with new tokens or a new finish
        reason; prompt logprobs once."""
        outputs = []
        for i, s in enumerate(self.samples):
            start = s.emitted
            done = s.finish_reason is not None and not s.finish_emitted
            if start == len(s.token_ids) and not done:
                continue
            outputs.append(
                CompletionOutput(
                    index=i,
                    token_ids=s.token_ids[start:],
                    logprobs=s.logprobs[start:],
                    top_logprobs=None if s.top_logprobs is None else s.top_logprobs[start:],
                    weight_versions=s.weight_versions[start:],
                    finish_reason=s.finish_reason,
                    stop_reason=s.stop_reason,
                    text=s.text if s.detok is None else self._new_text(s),
                    num_cached_tokens=s.num_cached_tokens,
                    num_preemptions=s.num_preemptions,
                )
            )
            s.emitted, s.finish_emitted = len(s.token_ids), s.finish_reason is not None
        prompt_lps = prompt_tops = None
        if self.prompt_logprobs is not None and not self._prompt_logprobs_emitted:
            prompt_lps, prompt_tops = self.prompt_logprobs, self.prompt_top_logprobs
            self._prompt_logprobs_emitted = True
        return self._request_output(outputs, prompt_lps, prompt_tops)

    @staticmethod
    def _new_text(s: _Sample) -> str:
        """Feed ``s.detok`` the tokens it has not read; the text they add (at the end: all the rest)."""
        assert s.detok is not None
        new, s.decoded = s.token_ids[s.decoded :], len(s.token_ids)
        return s.detok.step(new) if s.finish_reason is None else s.detok.finish(new, s.text)

    def _text_so_far(self, s: _Sample) -> str:
        assert s.detok is not None
        self._new_text(s)
        if s.finish_reason is not None and s.text is not None:
            return s.text  # the core's, exactly (see IncrementalDetokenizer.finish)
        return s.detok.text

    def _request_output(
        self,
        outputs: list[CompletionOutput],
        prompt_logprobs: list[float | None] | None,
        prompt_top_logprobs: list[dict[int, float] | None] | None,
    ) -> RequestOutput:
        return RequestOutput(
            request_id=self.request_id,
            prompt_token_ids=self.prompt_token_ids if self.prompt_token_ids is not None else [],
            outputs=outputs,
            prompt_logprobs=prompt_logprobs,
            prompt_top_logprobs=prompt_top_logprobs,
            prompt=self.prompt,
            finished=self.finished,
            num_cached_tokens=sum(s.num_cached_tokens for s in self.samples),
        )
