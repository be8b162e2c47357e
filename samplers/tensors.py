"""Per-step sampling tensors: the rows that sample this step, as device tensors plus host flags."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rollout.samplers.params import SamplingParams

_INT64_MIN, _UINT64_MAX = -(2**63), 2**64 - 1


@dataclass(frozen=True)
class RowSampling:
    """What the sampler needs to know about one row (one sequence) that samples this step."""

    params: SamplingParams  # the request's parameters
    seed: int  # the row's seed: params.seed (per-sample derived) or one the engine drew at random
    offset: int  # index of the output token being sampled: the RNG counter, stable across preemption
    banned_token_ids: Sequence[int] = ()  # tokens it may not sample now (EOS/stop ids before min_tokens)


@dataclass(frozen=True, eq=False)
class SamplingTensors:
    """Everything ``sample`` reads, for B rows and a vocabulary of V.

    Built on the host by ``build`` (one non-blocking copy per field, from pinned memory on CUDA).
    Per-row values are *effective* values: a disabled option holds its neutral value (top_k = V,
    top_p = 1, min_p = 0) so the sampler can apply it to every row unconditionally, and the host
    flags say which steps any row needs at all. Greedy rows in "raw" mode never use their
    processed distribution, so their top-k/top-p/min-p are neutralized too.
    """

    temperature: torch.Tensor  # [B] f32 > 0; 1.0 for greedy rows (their processed distribution is at T=1)
    greedy: torch.Tensor  # [B] bool: take the argmax instead of drawing
    top_k: torch.Tensor  # [B] i32 in [1, V]; V = off
    top_p: torch.Tensor  # [B] f32 in (0, 1]; 1 = off
    min_p: torch.Tensor  # [B] f32 in [0, 1]; 0 = off
    seeds: torch.Tensor  # [B] i64: the row's 64-bit seed (two's complement)
    offsets: torch.Tensor  # [B] i64: index of the output token being sampled (the RNG counter)
    processed_mode: torch.Tensor  # [B] bool: logprobs come from the processed distribution
    banned_rows: torch.Tensor  # [M] i64: row of each banned (row, token) pair
    banned_tokens: torch.Tensor  # [M] i64: token of each banned (row, token) pair
    vocab_size: int  # V: width of the logits this was built for
    all_greedy: bool  # every row is greedy: no random numbers, no temperature
    any_greedy: bool  # some row is greedy
    any_top_k: bool  # some row has top_k < V
    max_top_k: int  # largest top_k < V over the rows (0 when none): torch.topk width on the no-sort path
    any_top_p: bool  # some row has top_p < 1 (needs the full sort)
    any_min_p: bool  # some row has min_p > 0
    max_num_logprobs: int  # K: most top logprobs any row asked for (0: no top-k outputs)
    any_processed: bool  # some row wants processed logprobs

    @property
    def batch_size(self) -> int:
        """B, the number of rows."""
        return self.temperature.shape[0]

    @classmethod
    def build(
        cls, rows: Sequence[RowSampling], vocab_size: int, device: torch.device | str
    ) -> SamplingTensors:
        """Validate ``rows`` against ``vocab_size`` and copy their values to ``device``.

        Raises ``ValueError`` for a seed outside [-2**63, 2**64), a negative offset, or a banned
        token id outside [0, vocab_size); ``TypeError`` for a row that is not a ``RowSampling``.
        """
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
        device = torch.device(device)
        temperature, greedy, top_k, top_p, min_p = [], [], [], [], []
        seeds, offsets, processed = [], [], []
        banned_rows: list[int] = []
        banned_tokens: list[int] = []
        for i, row in enumerate(rows):
            if not isinstance(row, RowSampling):
                raise TypeError(f"rows[{i}] must be a RowSampling, got {type(row).__name__}")
            p = row.params
            is_greedy = p.is_greedy
            is_processed = p.logprobs_mode == "processed"
            uses_filters = is_processed or not is_greedy  # else nothing reads the processed distribution
            greedy.append(is_greedy)
            processed.append(is_processed)
            temperature.append(1.0 if is_greedy else p.temperature)
            top_k.append(min(p.top_k, vocab_size) if uses_filters and p.top_k > 0 else vocab_size)
            top_p.append(p.top_p if uses_filters else 1.0)
            min_p.append(p.min_p if uses_filters else 0.0)
            seeds.append(_signed64(_check_int(f"rows[{i}].seed", row.seed, _INT64_MIN, _UINT64_MAX)))
            offsets.append(_check_int(f"rows[{i}].offset", row.offset, 0, 2**63 - 1))
            for tok in row.banned_token_ids:
                banned_rows.append(i)
                banned_tokens.append(_check_int(f"rows[{i}].banned_token_ids", tok, 0, vocab_size - 1))

        active_k = [k for k in top_k if k < vocab_size]

        def put(values: list, dtype: torch.dtype) -> torch.Tensor:
            # Pinned host memory makes the copy truly asynchronous; the caching host allocator
            # keeps the buffer alive until the copy has run.
            pin = device.type == "cuda"
            return torch.tensor(values, dtype=dtype, pin_memory=pin).to(device, non_blocking=pin)

        return cls(
            temperature=put(temperature, torch.float32),
            greedy=put(greedy, torch.bool),
            top_k=put(top_k, torch.int32),
            top_p=put(top_p, torch.float32),
            min_p=put(min_p, torch.float32),
            seeds=put(seeds, torch.int64),
            offsets=put(offsets, torch.int64),
            processed_mode=put(processed, torch.bool),
            banned_rows=put(banned_rows, torch.int64),
            banned_tokens=put(banned_tokens, torch.int64),
            vocab_size=vocab_size,
            all_greedy=all(greedy),
            any_greedy=any(greedy),
            any_top_k=bool(active_k),
            max_top_k=max(active_k, default=0),
            any_top_p=any(v < 1.0 for v in top_p),
            any_min_p=any(v > 0.0 for v in min_p),
            max_num_logprobs=max((r.params.logprobs or 0 for r in rows), default=0),
            any_processed=any(processed),
        )


def _check_int(name: str, value: Any, lo: int, hi: int) -> int:
    if type(value) is not int:  # fast path first: this runs per row and per banned id every step
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
        value = int(value)
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value!r}")
    return value


def _signed64(value: int) -> int:
    """Map [-2**63, 2**64) onto int64 by two's complement (seeds 2**63 and -2**63 are the same bits)."""
    value &= _UINT64_MAX
    return value - 2**64 if value >= 2**63 else value
