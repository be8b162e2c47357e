"""Per-step sampling tensors: the rows that sample this step, as device tensors plus host flags."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
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
    # the row's token history, read only when its params have penalties
    output_token_ids: Sequence[int] = ()  # tokens it output so far
    prompt_token_ids: Sequence[int] = ()  # its prompt (repetition_penalty counts prompt tokens too)


@dataclass(eq=False)
class PenaltyHistory:
    """The token history of the rows with penalties, as (row, token) pairs; a token output k times
    appears k times. Prompt pairs are only needed for rows with a repetition penalty."""

    output_rows: list[int] = field(default_factory=list)
    output_tokens: list[int] = field(default_factory=list)
    prompt_rows: list[int] = field(default_factory=list)
    prompt_tokens: list[int] = field(default_factory=list)


@dataclass(eq=False)
class LogitBiasColumns:
    """(row, token, bias) triples of the rows with a logit bias."""

    rows: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    biases: list[float] = field(default_factory=list)

    def add(self, row: int, pairs: Sequence[tuple[int, float]], vocab_size: int | None = None) -> None:
        """Add row ``row``'s (token, bias) pairs; with ``vocab_size``, check the tokens against it."""
        for token, value in pairs:
            if vocab_size is not None:
                _check_int(f"rows[{row}].params.logit_bias token", token, 0, vocab_size - 1)
            self.rows.append(row)
            self.tokens.append(token)
            self.biases.append(value)

    def tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        index = to_device_async(torch.tensor([self.rows, self.tokens], dtype=torch.int64), device)
        return index[0], index[1], to_device_async(torch.tensor(self.biases, dtype=torch.float32), device)


@dataclass(frozen=True, eq=False)
class PenaltyTensors:
    """Per-row penalties and token history, for B rows (rows without penalties hold neutral values:
    0, 0, 1, and their history is not recorded)."""

    presence: torch.Tensor  # [B] f32, 0 = off
    frequency: torch.Tensor  # [B] f32, 0 = off
    repetition: torch.Tensor  # [B] f32, 1 = off
    output_counts: torch.Tensor  # [B, V] f32: how many times each token was output so far
    seen: torch.Tensor | None  # [B, V] bool: in the prompt or output (None: no repetition penalty)

    def add_output_tokens(self, rows: torch.Tensor, tokens: torch.Tensor) -> None:
        """Count one more output of ``tokens[i]`` in row ``rows[i]`` (device index tensors: tokens
        sampled by a step whose results have not reached the host yet)."""
        self.output_counts.index_put_((rows, tokens), self.output_counts.new_ones(()), accumulate=True)
        if self.seen is not None:
            self.seen.index_put_((rows, tokens), self.seen.new_ones(()))


@dataclass(frozen=True, eq=False)
class SamplingTensors:
    """Everything ``sample`` reads, for B rows and a vocabulary of V.

    Built on the host by ``build`` / ``from_columns`` (one non-blocking copy from pinned memory on
    CUDA; penalty history and logit biases, when any row has them, travel separately).
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
    penalties: PenaltyTensors | None = None  # None: no row has a penalty
    # (rows [N] i64, tokens [N] i64, biases [N] f32) added to the logits; None: no row has a logit bias
    logit_bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def batch_size(self) -> int:
        """B, the number of rows."""
        return self.temperature.shape[0]

    @staticmethod
    def buffer_bytes(rows: int, num_banned: int = 0) -> int:
        """Bytes of the device buffer ``from_columns`` fills for ``rows`` rows and ``num_banned``
        banned pairs: 34 per row and 16 per pair, each counted in whole groups of 16."""
        return 34 * (-(-rows // 16) * 16) + 16 * (-(-num_banned // 16) * 16)

    @classmethod
    def build(
        cls,
        rows: Sequence[RowSampling],
        vocab_size: int,
        device: torch.device | str,
        cache: dict[int, tuple[SamplingParams, RowValues]] | None = None,
    ) -> SamplingTensors:
        """Validate ``rows`` against ``vocab_size`` and copy their values to ``device``.

        Raises ``ValueError`` for a seed outside [-2**63, 2**64), a negative offset, or a banned
        token id outside [0, vocab_size); ``TypeError`` for a row that is not a ``RowSampling``.

        ``cache`` (optional, owned by the caller, e.g. the model runner) memoizes each params
        object's effective values by identity, so a step over the same requests does no per-row
        option work: only seeds and offsets are read per row. The per-row values travel to the
        device in one host-to-device copy (one buffer, pinned on CUDA).
        """
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
        device = torch.device(device)
        statics = []
        seeds, offsets = [], []
        banned_rows: list[int] = []
        banned_tokens: list[int] = []
        history = PenaltyHistory()
        bias = LogitBiasColumns()
        for i, row in enumerate(rows):
            if type(row) is not RowSampling and not isinstance(row, RowSampling):
                raise TypeError(f"rows[{i}] must be a RowSampling, got {type(row).__name__}")
            p = row.params
            entry = None if cache is None else cache.get(id(p))
            if entry is None or entry[0] is not p:
                entry = (p, effective_values(p, vocab_size))
                if cache is not None:
                    if len(cache) > 8192:  # params die with their requests: forget old ones
                        cache.clear()
                    cache[id(p)] = entry
            statics.append(entry[1])
            seed = row.seed
            if type(seed) is not int or not _INT64_MIN <= seed < 2**63:
                seed = _signed64(_check_int(f"rows[{i}].seed", seed, _INT64_MIN, _UINT64_MAX))
            seeds.append(seed)
            offset = row.offset
            if type(offset) is not int or offset < 0:
                offset = _check_int(f"rows[{i}].offset", offset, 0, 2**63 - 1)
            offsets.append(offset)
            if row.banned_token_ids:
                for tok in row.banned_token_ids:
                    banned_rows.append(i)
                    banned_tokens.append(_check_int(f"rows[{i}].banned_token_ids", tok, 0, vocab_size - 1))
            if entry[1].has_bias:
                bias.add(i, p.logit_bias, vocab_size)
            if entry[1].has_penalties:  # record the history
                for tok in row.output_token_ids:
                    history.output_rows.append(i)
                    history.output_tokens.append(
                        _check_int(f"rows[{i}].output_token_ids", tok, 0, vocab_size - 1)
                    )
                if entry[1].repetition != 1.0:
                    for tok in row.prompt_token_ids:
                        history.prompt_rows.append(i)
                        history.prompt_tokens.append(
                            _check_int(f"rows[{i}].prompt_token_ids", tok, 0, vocab_size - 1)
                        )
        if offsets and max(offsets) > 2**63 - 1:
            bad = next(o for o in offsets if o > 2**63 - 1)
            raise ValueError(f"offset must be in [0, {2**63 - 1}], got {bad!r}")
        return cls.from_columns(
            statics, seeds, offsets, banned_rows, banned_tokens, vocab_size, device, history, bias
        )

    @classmethod
    def from_columns(
        cls,
        statics: Sequence[RowValues],
        seeds: Sequence[int],
        offsets: Sequence[int],
        banned_rows: Sequence[int],
        banned_tokens: Sequence[int],
        vocab_size: int,
        device: torch.device,
        history: PenaltyHistory | None = None,
        bias: LogitBiasColumns | None = None,
        min_rows: int = 0,
        out: torch.Tensor | None = None,
    ) -> SamplingTensors:
        """``build`` from values already checked: per row, its ``effective_values`` tuple, its
        seed as int64 and its offset; the banned (row, token) pairs as two columns; the token
        history of the rows with penalties (None: no row has any); the logit biases of the rows that
        have them. The engine's model runner calls this with columns it keeps per request, so a step
        does no per-row object or validation work.

        ``out`` (a uint8 tensor on ``device``, at least ``buffer_bytes(max(rows, min_rows), banned)``
        long) receives the per-row values instead of a new device buffer, laid out as for
        ``min_rows`` rows when there are fewer: a CUDA graph captured over that layout reads them
        (``rollout.sampler_graphs``). The rows past the batch are then greedy raw rows at
        temperature 1, so the graph's results for them are finite (and ignored)."""
        num = len(statics)
        num_banned = len(banned_rows)
        # Host flags from the distinct value tuples (rows of one prompt share one): plain Python,
        # no per-row work.
        distinct = list({id(v): v for v in statics}.values())
        active_k = [v.top_k for v in distinct if v.top_k < vocab_size]
        # One buffer, one host-to-device copy; every segment starts at a multiple of 16 rows (the
        # padding rows are never read), so each per-row tensor the kernels read is 16-byte aligned
        # whatever the batch size: Triton specializes pointers on alignment, and a batch size that
        # moved one would compile a new kernel mid-run.
        ns = -(-max(num, min_rows) // 16) * 16
        nb = -(-num_banned // 16) * 16
        pin = device.type == "cuda"
        buf = torch.empty(cls.buffer_bytes(ns, nb), dtype=torch.uint8, pin_memory=pin)
        host = buf.numpy()
        f32 = host[: 16 * ns].view(np.float32).reshape(4, ns)  # temperature, top_p, min_p, top_k (i32)
        flags = host[16 * ns : 18 * ns].view(np.bool_).reshape(2, ns)  # greedy, processed
        i64 = host[18 * ns :].view(np.int64)  # seeds, offsets, banned rows, banned tokens
        if len(distinct) == 1:  # the common case: broadcast one row's values
            v = distinct[0]
            f32[:3, :num] = np.array(v[:3], dtype=np.float32)[:, None]
            f32[3, :num].view(np.int32)[:] = v.top_k
            flags[:, :num] = np.array(v[3:5], dtype=np.bool_)[:, None]
        elif num:
            stat = np.array(statics, dtype=np.float64)
            f32[:3, :num] = stat[:, :3].T
            f32[3, :num].view(np.int32)[:] = stat[:, 5]
            flags[:, :num] = stat[:, 3:5].T != 0
        i64[:num] = seeds
        i64[ns : ns + num] = offsets
        if out is not None and num < ns:  # a graph reads every row: padding rows greedy, raw, T = 1
            f32[:2, num:] = 1.0
            f32[2, num:] = 0.0
            f32[3, num:].view(np.int32)[:] = vocab_size
            flags[0, num:], flags[1, num:] = True, False
            i64[num:ns] = 0
            i64[ns + num : 2 * ns] = 0
        i64[2 * ns : 2 * ns + num_banned] = banned_rows
        i64[2 * ns + nb : 2 * ns + nb + num_banned] = banned_tokens
        # Pinned host memory makes the copy truly asynchronous; the caching host allocator keeps
        # the buffer alive until the copy has run.
        if out is None:
            dev = buf.to(device, non_blocking=pin)
        else:
            fits = out.dtype == torch.uint8 and out.dim() == 1 and out.numel() >= buf.numel()
            if not fits or not same_device(out.device, device):
                raise ValueError(
                    f"out must be a 1-D uint8 tensor on {device} of at least {buf.numel()} bytes, got "
                    f"{out.dtype} {tuple(out.shape)} on {out.device}"
                )
            dev = out[: buf.numel()]
            dev.copy_(buf, non_blocking=pin)
        has_penalties = any(v.has_penalties for v in distinct)
        penalties = _penalties(statics, history, vocab_size, device) if has_penalties else None
        # Few torch ops (each costs microseconds of host time): split the bytes by dtype, then each
        # dtype's segment into its fields with one split.
        f_dev, b_dev, i_dev = torch.split_with_sizes(dev, [16 * ns, 2 * ns, 16 * ns + 16 * nb])
        pad, padb = ns - num, nb - num_banned
        temperature, _, top_p, _, min_p, _, top_k, _ = torch.split_with_sizes(
            f_dev.view(torch.float32), [num, pad] * 4
        )
        greedy, _, processed, _ = torch.split_with_sizes(b_dev.view(torch.bool), [num, pad] * 2)
        seeds_d, _, offsets_d, _, ban_r, _, ban_t, _ = torch.split_with_sizes(
            i_dev.view(torch.int64), [num, pad, num, pad, num_banned, padb, num_banned, padb]
        )
        return cls(
            temperature=temperature,
            greedy=greedy,
            top_k=top_k.view(torch.int32),
            top_p=top_p,
            min_p=min_p,
            seeds=seeds_d,
            offsets=offsets_d,
            processed_mode=processed,
            banned_rows=ban_r,
            banned_tokens=ban_t,
            vocab_size=vocab_size,
            all_greedy=all(v.greedy for v in distinct),
            any_greedy=any(v.greedy for v in distinct),
            any_top_k=bool(active_k),
            max_top_k=int(max(active_k, default=0)),
            any_top_p=any(v.top_p < 1.0 for v in distinct),
            any_min_p=any(v.min_p > 0.0 for v in distinct),
            max_num_logprobs=int(max((v.num_logprobs for v in distinct), default=0)),
            any_processed=any(v.processed for v in distinct),
            penalties=penalties,
            logit_bias=bias.tensors(device) if bias is not None and bias.rows else None,
        )


def _penalties(
    statics: Sequence[RowValues], history: PenaltyHistory | None, vocab_size: int, device: torch.device
) -> PenaltyTensors:
    """The penalty tensors of a batch where some row has a penalty (rare in RL: built plainly)."""
    history = history or PenaltyHistory()
    num = len(statics)
    values = to_device_async(
        torch.tensor([(v.presence, v.frequency, v.repetition) for v in statics], dtype=torch.float32)
        .reshape(num, 3)
        .T,
        device,
    )
    counts = torch.zeros((num, vocab_size), dtype=torch.float32, device=device)
    out = _pairs(history.output_rows, history.output_tokens, device)
    counts.index_put_(out, counts.new_ones(()), accumulate=True)
    seen = None
    if any(v.repetition != 1.0 for v in statics):
        seen = torch.zeros((num, vocab_size), dtype=torch.bool, device=device)
        seen.index_put_(out, seen.new_ones(()))
        seen.index_put_(_pairs(history.prompt_rows, history.prompt_tokens, device), seen.new_ones(()))
    return PenaltyTensors(values[0], values[1], values[2], counts, seen)


def _pairs(rows: list[int], tokens: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    both = to_device_async(torch.tensor([rows, tokens], dtype=torch.int64).reshape(2, len(rows)), device)
    return both[0], both[1]


def same_device(a: torch.device, b: torch.device) -> bool:
    """Whether ``a`` and ``b`` name one device (``cuda`` without an index: the current one)."""
    if a.type != b.type:
        return False
    if a.type != "cuda" or a.index == b.index:
        return True
    current = torch.cuda.current_device()
    return (current if a.index is None else a.index) == (current if b.index is None else b.index)


def to_device_async(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``host`` on ``device`` without making the host wait for the device: from pinned memory on CUDA
    (a copy from pageable memory waits for the stream's queued work)."""
    host = host.contiguous()
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


class RowValues(NamedTuple):
    """One row's effective option values (see ``SamplingTensors``): the numeric columns first (the
    order ``from_columns`` reads them in), then two flags."""

    temperature: float
    top_p: float
    min_p: float
    greedy: bool
    processed: bool
    top_k: int
    num_logprobs: int
    presence: float
    frequency: float
    repetition: float
    has_penalties: bool
    has_bias: bool


def effective_values(p: SamplingParams, vocab_size: int) -> RowValues:
    """The effective values of a row sampled under ``p``. Penalties and biases stay on for greedy
    rows: they move the argmax."""
    is_greedy = p.is_greedy
    is_processed = p.logprobs_mode == "processed"
    uses_filters = is_processed or not is_greedy  # else nothing reads the processed distribution
    return RowValues(
        1.0 if is_greedy else p.temperature,
        p.top_p if uses_filters else 1.0,
        p.min_p if uses_filters else 0.0,
        is_greedy,
        is_processed,
        min(p.top_k, vocab_size) if uses_filters and p.top_k > 0 else vocab_size,
        p.logprobs or 0,
        p.presence_penalty,
        p.frequency_penalty,
        p.repetition_penalty,
        p.has_penalties,
        bool(p.logit_bias),
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
