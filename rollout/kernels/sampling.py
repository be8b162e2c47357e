"""Fused sampling for rows without top-k / top-p / min-p: one split-vocab pass plus a per-row merge.

What it computes, per row ``r`` of ``logits`` [B, V], all in float32 (the contract of
``rollout.samplers.sampler``, restricted to rows with no filters):

* ``processed = logits / temperature`` (IEEE division, as torch does), banned tokens -inf;
* the token: ``argmax(processed - log E)`` with ``log E`` from the counter-based hash of
  ``rollout.samplers.rng`` (the same 32 random bits, the same float32 formula), or
  ``argmax(processed)`` for greedy rows; ties go to the lowest id, like ``torch.argmax``;
* the token's logprob under ``log_softmax(logits)`` ("raw" rows) or ``log_softmax(processed)``
  ("processed" rows), and that distribution's log-sum-exp (for top-k logprobs).

Pass 1 (grid ``[B, C]``) streams one chunk of a row's vocabulary in tiles of ``BLOCK`` columns and
keeps, in registers, the online max / sum-exp of the raw and processed logits and the race
winner (value, lowest column). Pass 2 (grid ``[B]``) merges the ``C`` partials of each row in
column order, so ties still go to the lowest id, and reads the winner's logit once.

Bit-exactness: the hash is uint32 arithmetic, exact everywhere. On CUDA ``log1p`` and ``log`` are
libdevice's ``log1pf``/``logf``, the functions torch's CUDA kernels call, so the noise (and with it
the token) should be bit-identical to the torch path's (tests/kernels check it on CUDA). Triton's
interpreter (``TRITON_INTERPRET=1``, CPU) has no libdevice: there ``log1p`` is Goldberg's formula,
within a few ulps of torch's CPU log1p.

Banned tokens come as (row, token) pairs; they are grouped by row with a device sort (no host
sync) and each tile masks its row's list, so the cost grows with the number of bans per row
(few in practice: EOS and stop ids before ``min_tokens``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from rollout.samplers.rng import _MAX_UNIFORM, _MUL1, _MUL2, _SEED_SALT, _TWO_POW_M32

# The hash constants of rollout.samplers.rng, as compile-time constants of the kernels.
_K_MUL1 = tl.constexpr(_MUL1)
_K_MUL2 = tl.constexpr(_MUL2)
_K_SALT = tl.constexpr(_SEED_SALT)
_K_TWO_POW_M32 = tl.constexpr(_TWO_POW_M32)
_K_MAX_UNIFORM = tl.constexpr(_MAX_UNIFORM)

_LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_NUM_STATS = 5  # partial float stats per (row, chunk): raw max, raw sum-exp, processed max/sum-exp, best key
_DEFAULT_BLOCK = 2048
_DEFAULT_WARPS = 8
_PROGRAMS_PER_SM = 16  # pass-1 programs to aim for per SM when splitting rows into chunks


@dataclass(frozen=True, eq=False)
class FusedSampleOutput:
    """Device tensors for the B rows of one step (see the module docstring)."""

    token_ids: torch.Tensor  # [B] i64: the sampled (or argmax) token
    logprobs: torch.Tensor  # [B] f32: its logprob in the row's mode
    lse: torch.Tensor  # [B] f32: log-sum-exp of the row's logprob source (raw or processed logits)
    source: torch.Tensor | None  # [B, V] f32 processed logits for processed rows, raw for raw rows; or None


# ----------------------------------------------------------------------------------------------
# Triton device functions and kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _mix32(x):
    """rng.mix32 on uint32 values (wrapping multiply = the int64 multiply masked to 32 bits)."""
    x = x ^ (x >> 16)
    x = x * _K_MUL1
    x = x ^ (x >> 15)
    x = x * _K_MUL2
    return x ^ (x >> 16)


@triton.jit
def _row_key(seed, offset):
    """rng.row_keys for one row: int64 seed and offset -> uint32 key."""
    key = _mix32((seed & 0xFFFFFFFF).to(tl.uint32) ^ _K_SALT)
    key = _mix32(key ^ ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32))
    key = _mix32(key ^ (offset & 0xFFFFFFFF).to(tl.uint32))
    return _mix32(key ^ ((offset >> 32) & 0xFFFFFFFF).to(tl.uint32))


@triton.jit
def _race_noise(key, cols, EXACT_LIBM: tl.constexpr):
    """(uint32 random bits, float32 log E) of rng.random_bits / rng.log_exponential at ``cols``."""
    bits = _mix32(key ^ _mix32(cols.to(tl.uint32)))
    u = tl.minimum((bits.to(tl.float32) + 0.5) * _K_TWO_POW_M32, _K_MAX_UNIFORM)
    if EXACT_LIBM:
        log_e = libdevice.log(-libdevice.log1p(-u))
    else:
        # Goldberg's log1p(x) = x * log(1 + x) / ((1 + x) - 1): accurate where 1 + x rounds.
        w = 1.0 - u
        log1p = tl.where(w == 1.0, -u, tl.log(w) * (-u / (w - 1.0)))
        log_e = tl.log(-log1p)
    return bits, log_e


@triton.jit
def _online_lse(m, s, x):
    """Fold tile ``x`` into a running (max, sum of exp(x - max)); all -inf so far gives (-inf, 0)."""
    m_new = tl.maximum(m, tl.max(x, 0))
    ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, s * tl.exp(m - ref) + tl.sum(tl.exp(x - ref), 0)


# Arguments that change with the batch are not specialized: a new value's divisibility by 16 would
# otherwise compile a new kernel in the middle of serving (~1 s each on the H100).
@triton.jit(do_not_specialize=["B", "chunk_cols"])
def _partials_kernel(
    logits_ptr, stride_row, temperature_ptr, greedy_ptr, seeds_ptr, offsets_ptr, processed_ptr,
    ban_ptr_ptr, ban_tok_ptr, part_f_ptr, part_i_ptr, source_ptr, B, V, chunk_cols,
    BLOCK: tl.constexpr, ALL_GREEDY: tl.constexpr, NEED_PROCESSED: tl.constexpr,
    HAS_BANS: tl.constexpr, WRITE_SOURCE: tl.constexpr, EXACT_LIBM: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    num_chunks = tl.num_programs(1)
    x_row = logits_ptr + row.to(tl.int64) * stride_row
    temperature = tl.load(temperature_ptr + row)
    greedy = tl.load(greedy_ptr + row)
    is_processed = tl.load(processed_ptr + row)
    if not ALL_GREEDY:
        key = _row_key(tl.load(seeds_ptr + row), tl.load(offsets_ptr + row))
    if HAS_BANS:
        ban_lo = tl.load(ban_ptr_ptr + row)
        ban_hi = tl.load(ban_ptr_ptr + row + 1)

    lanes = tl.arange(0, BLOCK)
    start0 = chunk * chunk_cols
    m_raw = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), 0)
    s_raw = tl.sum(tl.zeros([BLOCK], tl.float32), 0)
    m_p = m_raw
    s_p = s_raw
    best = m_raw
    best_col = start0
    for start in range(start0, tl.minimum(start0 + chunk_cols, V), BLOCK):  # the last chunk may be short
        cols = start + lanes
        in_row = cols < V
        x = tl.load(x_row + cols, mask=in_row, other=float("-inf")).to(tl.float32)
        m_raw, s_raw = _online_lse(m_raw, s_raw, x)
        xp = x
        if not ALL_GREEDY:
            xp = tl.math.div_rn(x, temperature)  # greedy rows hold temperature 1: exact
        if HAS_BANS:
            for j in range(ban_lo, ban_hi):
                xp = tl.where(cols == tl.load(ban_tok_ptr + j), float("-inf"), xp)
        if NEED_PROCESSED:
            m_p, s_p = _online_lse(m_p, s_p, xp)
        race = xp
        if not ALL_GREEDY:
            _, log_e = _race_noise(key, cols, EXACT_LIBM)
            race = xp - tl.where(greedy, 0.0, log_e)
        tile_best, tile_col = tl.max(race, 0, return_indices=True, return_indices_tie_break_left=True)
        # Strictly greater: an earlier tile (lower column) keeps a tie.
        best_col = tl.where(tile_best > best, start + tile_col, best_col)
        best = tl.maximum(best, tile_best)
        if WRITE_SOURCE:
            src = tl.where(is_processed, xp, x)
            tl.store(source_ptr + row.to(tl.int64) * V + cols, src, mask=in_row)

    out = row * num_chunks + chunk
    plane = B * num_chunks
    tl.store(part_f_ptr + out, m_raw)
    tl.store(part_f_ptr + plane + out, s_raw)
    if NEED_PROCESSED:
        tl.store(part_f_ptr + 2 * plane + out, m_p)
        tl.store(part_f_ptr + 3 * plane + out, s_p)
    tl.store(part_f_ptr + 4 * plane + out, best)
    tl.store(part_i_ptr + out, best_col)


@triton.jit
def _merged_lse(m_ptr, s_ptr, idx, mask):
    m = tl.load(m_ptr + idx, mask=mask, other=float("-inf"))
    s = tl.load(s_ptr + idx, mask=mask, other=0.0)
    m_all = tl.max(m, 0)
    ref = tl.where(m_all == float("-inf"), 0.0, m_all)
    return m_all + tl.log(tl.sum(s * tl.exp(m - ref), 0))


@triton.jit(do_not_specialize=["B", "C"])
def _merge_kernel(
    logits_ptr, stride_row, temperature_ptr, processed_ptr, part_f_ptr, part_i_ptr,
    token_ptr, logprob_ptr, lse_ptr, B, C, NEED_PROCESSED: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    c = tl.arange(0, BLOCK_C)
    in_row = c < C
    idx = row * C + c
    plane = B * C
    keys = tl.load(part_f_ptr + 4 * plane + idx, mask=in_row, other=float("-inf"))
    best, best_chunk = tl.max(keys, 0, return_indices=True, return_indices_tie_break_left=True)
    token = tl.load(part_i_ptr + row * C + best_chunk)
    x_tok = tl.load(logits_ptr + row.to(tl.int64) * stride_row + token).to(tl.float32)
    lse = _merged_lse(part_f_ptr, part_f_ptr + plane, idx, in_row)
    logprob = x_tok - lse
    if NEED_PROCESSED:
        lse_p = _merged_lse(part_f_ptr + 2 * plane, part_f_ptr + 3 * plane, idx, in_row)
        # The winner is banned only when every token is (its key is then -inf).
        xp_tok = tl.where(
            best == float("-inf"), float("-inf"), tl.math.div_rn(x_tok, tl.load(temperature_ptr + row))
        )
        is_processed = tl.load(processed_ptr + row)
        logprob = tl.where(is_processed, xp_tok - lse_p, logprob)
        lse = tl.where(is_processed, lse_p, lse)
    tl.store(token_ptr + row, token.to(tl.int64))
    tl.store(logprob_ptr + row, logprob)
    tl.store(lse_ptr + row, lse)


@triton.jit
def _noise_kernel(
    seeds_ptr, offsets_ptr, bits_ptr, log_e_ptr, N, BLOCK: tl.constexpr, EXACT_LIBM: tl.constexpr
):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    key = _row_key(tl.load(seeds_ptr + row), tl.load(offsets_ptr + row))
    bits, log_e = _race_noise(key, cols, EXACT_LIBM)
    out = row.to(tl.int64) * N + cols
    tl.store(bits_ptr + out, bits.to(tl.int64), mask=cols < N)
    tl.store(log_e_ptr + out, log_e, mask=cols < N)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def is_interpreted() -> bool:
    """True when the kernels of this module run in Triton's CPU interpreter (TRITON_INTERPRET=1).

    Triton reads the variable when ``@triton.jit`` decorates a function, i.e. when this module is
    first imported: set it before that import.
    """
    return not isinstance(_partials_kernel, triton.runtime.JITFunction)


def fused_sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    greedy: torch.Tensor,
    seeds: torch.Tensor,
    offsets: torch.Tensor,
    processed_mode: torch.Tensor,
    banned_rows: torch.Tensor,
    banned_tokens: torch.Tensor,
    *,
    all_greedy: bool,
    any_processed: bool,
    write_source: bool = False,
    num_chunks: int | None = None,
    block_size: int | None = None,
    num_warps: int | None = None,
) -> FusedSampleOutput:
    """Sample one token per row of ``logits`` ([B, V] f32/f16/bf16, unit column stride), no filters.

    Per-row tensors (length B, on the logits' device): ``temperature`` f32 (1 for greedy rows),
    ``greedy`` bool, ``seeds``/``offsets`` i64, ``processed_mode`` bool. ``banned_rows`` and
    ``banned_tokens`` (length M, i64) list (row, token) pairs set to -inf in the processed logits,
    in any order; every value must be in range (checked when SamplingTensors are built, not here:
    checking device values would sync). ``all_greedy`` / ``any_processed`` are the host flags of
    those tensors; they select kernel variants and must be true to the data. ``write_source`` also
    returns each row's logprob source (for top-k logprobs and ranks).

    ``num_chunks`` (vocab chunks per row), ``block_size`` (columns per tile, a power of 2) and
    ``num_warps`` override the launch heuristics (tests, tuning). Never reads a device value on
    the host. Raises ``ValueError`` for a shape, dtype, stride or device that does not fit.
    """
    _check(logits, temperature, greedy, seeds, offsets, processed_mode, banned_rows, banned_tokens)
    batch, vocab = logits.shape
    device = logits.device
    block = block_size or min(_DEFAULT_BLOCK, max(16, triton.next_power_of_2(vocab)))
    if block & (block - 1) or not 16 <= block <= 2**16:
        raise ValueError(f"block_size must be a power of 2 in [16, 65536], got {block}")
    tiles = triton.cdiv(vocab, block)
    if num_chunks is None:
        num_chunks = _default_num_chunks(batch, tiles, device)
    if not 1 <= num_chunks <= tiles:
        raise ValueError(f"num_chunks must be in [1, {tiles}] for V={vocab}, block={block}, got {num_chunks}")
    chunk_tiles = triton.cdiv(tiles, num_chunks)
    num_chunks = triton.cdiv(tiles, chunk_tiles)  # no empty chunks

    token_ids = torch.empty(batch, dtype=torch.int64, device=device)
    logprobs = torch.empty(batch, dtype=torch.float32, device=device)
    lse = torch.empty(batch, dtype=torch.float32, device=device)
    source = torch.empty((batch, vocab), dtype=torch.float32, device=device) if write_source else None
    if batch == 0:
        return FusedSampleOutput(token_ids, logprobs, lse, source)

    has_bans = banned_rows.shape[0] > 0
    if has_bans:
        # Group the pairs by row (stable device sort) and index each row's run: CSR, no host sync.
        rows_sorted, order = banned_rows.sort(stable=True)
        ban_tokens = banned_tokens[order]
        ban_ptr = torch.searchsorted(rows_sorted, torch.arange(batch + 1, dtype=torch.int64, device=device))
    else:
        ban_tokens = ban_ptr = banned_tokens
    part_f = torch.empty((_NUM_STATS, batch, num_chunks), dtype=torch.float32, device=device)
    part_i = torch.empty((batch, num_chunks), dtype=torch.int32, device=device)
    _partials_kernel[(batch, num_chunks)](
        logits, logits.stride(0), temperature, greedy, seeds, offsets, processed_mode, ban_ptr, ban_tokens,
        part_f, part_i, source if source is not None else logits, batch, vocab, chunk_tiles * block,
        BLOCK=block, ALL_GREEDY=all_greedy, NEED_PROCESSED=any_processed,
        HAS_BANS=has_bans, WRITE_SOURCE=write_source, EXACT_LIBM=not is_interpreted(),
        num_warps=num_warps or _DEFAULT_WARPS,
    )  # fmt: skip
    _merge_kernel[(batch,)](
        logits, logits.stride(0), temperature, processed_mode, part_f, part_i, token_ids, logprobs, lse,
        batch, num_chunks, NEED_PROCESSED=any_processed, BLOCK_C=max(16, triton.next_power_of_2(tiles)),
        num_warps=1,
    )  # fmt: skip
    return FusedSampleOutput(token_ids, logprobs, lse, source)


def race_noise(
    seeds: torch.Tensor, offsets: torch.Tensor, num_cols: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' random numbers, for tests: ([B, num_cols] i64 bits, [B, num_cols] f32 log E).

    Must equal ``rng.random_bits`` exactly and ``rng.log_exponential`` bitwise on CUDA (within a
    few ulps in the interpreter, whose log1p differs).
    """
    if seeds.shape != offsets.shape or seeds.dim() != 1:
        raise ValueError(
            f"seeds and offsets must be matching 1-D tensors, got {seeds.shape} and {offsets.shape}"
        )
    if seeds.dtype != torch.int64 or offsets.dtype != torch.int64:
        raise ValueError(f"seeds and offsets must be int64, got {seeds.dtype} and {offsets.dtype}")
    bits = torch.empty((seeds.shape[0], num_cols), dtype=torch.int64, device=seeds.device)
    log_e = torch.empty((seeds.shape[0], num_cols), dtype=torch.float32, device=seeds.device)
    if bits.numel():
        block = min(1024, triton.next_power_of_2(num_cols))
        grid = (seeds.shape[0], triton.cdiv(num_cols, block))
        _noise_kernel[grid](
            seeds, offsets, bits, log_e, num_cols, BLOCK=block, EXACT_LIBM=not is_interpreted()
        )
    return bits, log_e


def _default_num_chunks(batch: int, tiles: int, device: torch.device) -> int:
    """Split rows into chunks until the grid has about _PROGRAMS_PER_SM programs per SM."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    return max(1, min(tiles, triton.cdiv(_PROGRAMS_PER_SM * sms, max(batch, 1))))


def _check(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    greedy: torch.Tensor,
    seeds: torch.Tensor,
    offsets: torch.Tensor,
    processed_mode: torch.Tensor,
    banned_rows: torch.Tensor,
    banned_tokens: torch.Tensor,
) -> None:
    if logits.dim() != 2 or logits.dtype not in _LOGIT_DTYPES:
        raise ValueError(
            f"logits must be [B, V] float32/float16/bfloat16, got {tuple(logits.shape)} {logits.dtype}"
        )
    batch, vocab = logits.shape
    if logits.stride(1) != 1 and vocab > 1:
        raise ValueError(f"logits must have unit column stride, got strides {logits.stride()}")
    if not 1 <= vocab < 2**31:
        raise ValueError(f"vocab size must be in [1, 2**31), got {vocab}")
    if logits.device.type != "cuda" and not is_interpreted():
        raise ValueError(
            f"logits on {logits.device}: the kernel needs CUDA (or TRITON_INTERPRET=1 at import)"
        )
    rows = {"temperature": (temperature, torch.float32), "greedy": (greedy, torch.bool)}
    rows |= {"seeds": (seeds, torch.int64), "offsets": (offsets, torch.int64)}
    rows |= {"processed_mode": (processed_mode, torch.bool)}
    for name, (tensor, dtype) in rows.items():
        if tensor.shape != (batch,) or tensor.dtype != dtype or not tensor.is_contiguous():
            raise ValueError(
                f"{name} must be contiguous {dtype} [{batch}], got {tensor.dtype} {tensor.shape}"
            )
    if banned_rows.dim() != 1 or banned_rows.shape != banned_tokens.shape:
        raise ValueError(f"banned pairs must be matching 1-D, got {banned_rows.shape} {banned_tokens.shape}")
    if banned_rows.dtype != torch.int64 or banned_tokens.dtype != torch.int64:
        raise ValueError(f"banned pairs must be int64, got {banned_rows.dtype} and {banned_tokens.dtype}")
    for name, tensor in [
        *((n, t) for n, (t, _) in rows.items()),
        ("banned", banned_rows),
        ("banned", banned_tokens),
    ]:
        if tensor.device != logits.device:
            raise ValueError(f"{name} on {tensor.device} but logits on {logits.device}")
