"""Which rows of a step sample and with what: the sampling rows as columns (values, seeds, RNG
counters, banned tokens, penalties, biases) and the prompt rows whose logprobs were asked for;
their sampling tensors; and the host-side top-logprob dicts of the results."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from rollout.request import Request
from rollout.samplers.params import SamplingParams
from rollout.samplers.tensors import (
    LogitBiasColumns,
    PenaltyHistory,
    RowValues,
    SamplingTensors,
    effective_values,
    to_device_async,
)
from rollout.scheduler import ScheduledBatch

if TYPE_CHECKING:
    from rollout.model_runner import StepHandle

PromptRows = tuple[str, int, int, list[int], int]


@dataclass(eq=False)
class SamplingRows:
    """One step's sampling rows as columns (see ``SamplingTensors.from_columns``)."""

    values: list[RowValues] = field(default_factory=list)  # effective_values of each row's params
    seeds: list[int] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    banned_rows: list[int] = field(default_factory=list)
    banned_tokens: list[int] = field(default_factory=list)
    bias: LogitBiasColumns | None = None  # of the rows with a logit bias
    requests: list[Request] = field(default_factory=list)  # the request of each row
    penalized: list[int] = field(default_factory=list)  # rows with penalties

    def history(self, prev: StepHandle | None) -> tuple[PenaltyHistory, list[int], list[int]]:
        """The token history of the penalized rows: what the host knows, as (row, token) pairs, and
        (rows, indexes in ``prev``'s sampled tokens) of the last output tokens still on the device
        (overlapped loop). O(tokens so far): built only when the tensors are."""
        history = PenaltyHistory()
        pending_rows: list[int] = []
        pending_src: list[int] = []
        for row in self.penalized:
            req = self.requests[row]
            outputs = req.token_ids[len(req.prompt_token_ids) :]
            history.output_rows.extend([row] * len(outputs))
            history.output_tokens.extend(outputs)
            if self.values[row].repetition != 1.0:  # the prompt counts too
                history.prompt_rows.extend([row] * len(req.prompt_token_ids))
                history.prompt_tokens.extend(req.prompt_token_ids)
            if req.num_pending > 1:  # besides this step's: the previous step's token
                assert prev is not None
                pending_rows.append(row)
                pending_src.append(prev.row_of(req))
        return history, pending_rows, pending_src

    def fused_only(self, vocab_size: int) -> bool:
        """Whether the fused sampling kernel alone serves these rows, whatever its host flags (a
        decode graph's captured sampler, ``rollout.sampler_graphs``): no top-k / top-p / min-p,
        penalties, logit biases or banned tokens, and no top logprobs from processed logits."""
        if self.banned_rows or self.bias is not None or self.penalized:
            return False
        for v in {id(v): v for v in self.values}.values():  # rows of one params share the tuple
            if v.top_k < vocab_size or v.top_p < 1.0 or v.min_p > 0.0 or (v.num_logprobs and v.processed):
                return False
        return True

    def tensors(
        self,
        vocab_size: int,
        device: torch.device,
        prev: StepHandle | None = None,
        min_rows: int = 0,
        out: torch.Tensor | None = None,
    ) -> SamplingTensors:
        """The rows' sampling tensors (``min_rows`` and ``out``: see ``SamplingTensors.from_columns``)."""
        history, pending_rows, pending_src = self.history(prev) if self.penalized else (None, [], [])
        t = SamplingTensors.from_columns(
            self.values,
            self.seeds,
            self.offsets,
            self.banned_rows,
            self.banned_tokens,
            vocab_size,
            device,
            history,
            self.bias,
            min_rows,
            out,
        )
        if pending_rows:
            assert t.penalties is not None and prev is not None and prev.token_ids is not None
            idx = to_device_async(torch.tensor([pending_rows, pending_src]), device)
            t.penalties.add_output_tokens(idx[0], prev.token_ids.index_select(0, idx[1]))
        return t


def sampling_rows(
    batch: ScheduledBatch, values_of: Callable[[SamplingParams], RowValues]
) -> tuple[SamplingRows, list[PromptRows]]:
    """The rows that sample, as columns, and (request_id, first hidden row, count, next ids, k) of
    the prompt positions whose logprobs were asked for. ``values_of``: a request's effective
    sampling values, computed once per request (``ValuesCache``)."""
    rows = SamplingRows()
    prompt_rows: list[PromptRows] = []
    values, seeds, offsets = rows.values, rows.seeds, rows.offsets
    row = 0
    for s in batch.requests:
        req = s.request
        if s.sample:
            v = req.sampling_values
            if v is None:
                v = req.sampling_values = values_of(req.params)
            values.append(v)
            rows.requests.append(req)
            seeds.append(req.seed)  # int64: drawn or derived by the engine
            # The RNG counter: the index of the output token sampled now. update_computed already
            # counted it as pending, together with any token still in flight before it.
            offset = req.num_output_tokens + req.num_pending - 1
            offsets.append(offset)
            if offset < req.params.min_tokens:
                banned = banned_tokens(req)
                rows.banned_rows.extend([len(seeds) - 1] * len(banned))
                rows.banned_tokens.extend(banned)
            if v.has_penalties:  # the row needs its token history (read only if tensors are built)
                rows.penalized.append(len(seeds) - 1)
            if v.has_bias:  # (tokens checked against the vocabulary at admission)
                rows.bias = rows.bias or LogitBiasColumns()
                rows.bias.add(len(seeds) - 1, req.params.logit_bias)
        k = req.params.prompt_logprobs
        if k is not None:
            start, n = s.start, s.num_new_tokens
            last_prompt_pos = req.num_prompt_tokens - 1  # logits at p predict token p + 1
            if start < last_prompt_pos:
                count = min(start + n, last_prompt_pos) - start
                prompt_rows.append(
                    (req.request_id, row, count, req.token_ids[start + 1 : start + 1 + count], k)
                )
        row += s.num_new_tokens
    return rows, prompt_rows


def banned_tokens(req: Request) -> list[int]:
    """EOS and stop tokens may not be sampled before min_tokens outputs exist."""
    return sorted(set(req.eos_token_ids) | set(req.params.stop_token_ids))


class ValuesCache:
    """``effective_values`` of each params object, computed once: requests that share params share
    the tuple, which lets ``SamplingTensors.from_columns`` broadcast it."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self._entries: dict[int, tuple[SamplingParams, RowValues]] = {}

    def __call__(self, params: SamplingParams) -> RowValues:
        entry = self._entries.get(id(params))
        if entry is None or entry[0] is not params:
            if len(self._entries) > 4096:  # params die with their requests: forget old ones
                self._entries.clear()
            entry = self._entries[id(params)] = (params, effective_values(params, self.vocab_size))
        return entry[1]


def top_dicts(
    ids: torch.Tensor | None, logprobs: torch.Tensor | None, wanted: list[int]
) -> list[dict[int, float] | None]:
    if ids is None or logprobs is None or not any(wanted):
        return [None] * len(wanted)
    ids_l, lp_l = ids.tolist(), logprobs.tolist()
    return [dict(zip(ids_l[i][:k], lp_l[i][:k], strict=True)) if k else None for i, k in enumerate(wanted)]
