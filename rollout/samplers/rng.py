"""Counter-based random numbers for sampling: a pure function of (seed, offset, vocab index).

Every random number the sampler uses is ``U = uniform(seed, offset, index)``: a hash of the row's
seed, the row's counter (the index of the output token being sampled) and the vocabulary column.
There is no generator state, so:

* the same request with the same seed draws the same numbers whatever else is in the batch, in
  whatever row it sits, and after preemption + recompute (its offset is the same);
* nothing is read back to the host and no ``torch.Generator`` is threaded through the step;
* CPU and GPU produce the same bits (integer ops are exact on both).

The hash is built only from int64 xor, shift, mask and multiply, with every intermediate value
kept below 2**63: torch has no unsigned 64-bit arithmetic, and signed overflow is not something to
rely on across backends. State is 32 bits wide (``0 <= x < 2**32``); multiplier constants are odd
and below 2**31, so ``x * c < 2**63`` is exact and ``& 0xFFFFFFFF`` reduces it mod 2**32.

The mixer is the xorshift-multiply finalizer of Chris Wellons' "lowbias32" (shifts 16, 15, 16;
first multiplier 0x7FEB352D) with bit 31 of the second multiplier cleared (0x846CA68B ->
0x046CA68B) so the product stays exact. Its avalanche bias, measured over 2**21 inputs, is at the
sampling-noise floor of the measurement, like the original's. tests/samplers check the output for
uniformity, per-bit balance, and correlation across adjacent indices, offsets and seeds.

Resolution: 32 random bits per number; ``U`` is finest near 0 (where float32 is dense), which is
where the exponential race ``E = -log1p(-U)`` needs it: a low-probability token wins only with a
small ``E``.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_MUL1 = 0x7FEB352D  # lowbias32 first multiplier (already < 2**31)
_MUL2 = 0x046CA68B  # lowbias32 second multiplier, bit 31 cleared (see module docstring)
_SEED_SALT = 0x5BD1E995  # xored into the seed so that seed 0 does not start from state 0
_TWO_POW_M32 = 2.0**-32
_MAX_UNIFORM = 1.0 - 2.0**-24  # largest float32 below 1: U must stay strictly inside (0, 1)


def mix32(x: torch.Tensor) -> torch.Tensor:
    """Bijective 32-bit mixer on int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * _MUL1) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _MUL2) & _MASK32
    return x ^ (x >> 16)


def row_keys(seeds: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """[B] int64 seeds and offsets -> [B] int64 32-bit keys, one per (seed, offset) pair.

    Each 32-bit half of the seed and of the offset is absorbed by one mixing round, so any change
    to either input is mixed by at least two rounds before it reaches the key.
    """
    key = mix32((seeds & _MASK32) ^ _SEED_SALT)
    key = mix32(key ^ ((seeds >> 32) & _MASK32))  # arithmetic shift; the mask drops the sign
    key = mix32(key ^ (offsets & _MASK32))
    return mix32(key ^ ((offsets >> 32) & _MASK32))


def random_bits(seeds: torch.Tensor, offsets: torch.Tensor, num_cols: int) -> torch.Tensor:
    """[B] seeds, [B] offsets -> [B, num_cols] int64 uniform random integers in [0, 2**32).

    Column ``i`` of row ``r`` depends only on ``(seeds[r], offsets[r], i)``. The column index is
    hashed on its own first (a [num_cols] vector), so two rows never see shifted copies of one
    another's stream, as they would if the index were simply added to the key.
    """
    if seeds.shape != offsets.shape or seeds.dim() != 1:
        raise ValueError(
            f"seeds and offsets must be matching 1-D tensors, got {seeds.shape} and {offsets.shape}"
        )
    if seeds.dtype != torch.int64 or offsets.dtype != torch.int64:
        raise ValueError(f"seeds and offsets must be int64, got {seeds.dtype} and {offsets.dtype}")
    cols = mix32(torch.arange(num_cols, dtype=torch.int64, device=seeds.device))
    return mix32(row_keys(seeds, offsets)[:, None] ^ cols[None, :])


def uniform(seeds: torch.Tensor, offsets: torch.Tensor, num_cols: int) -> torch.Tensor:
    """[B, num_cols] float32 uniform numbers strictly inside (0, 1); see ``random_bits``."""
    u = random_bits(seeds, offsets, num_cols).to(torch.float32)
    # Bucket midpoints keep U > 0; int -> float32 rounding near 2**32 could reach 1.0, hence the clamp.
    return ((u + 0.5) * _TWO_POW_M32).clamp_(max=_MAX_UNIFORM)


def log_exponential(seeds: torch.Tensor, offsets: torch.Tensor, num_cols: int) -> torch.Tensor:
    """[B, num_cols] float32 ``log(E)`` with ``E ~ Exp(1)``, finite everywhere.

    ``E = -log1p(-U)`` rather than ``-log(U)``: both are Exp(1), but this one is exact for small
    ``E`` (U is finest near 0), and small ``E`` is what lets an unlikely token win the race.
    """
    u = uniform(seeds, offsets, num_cols)
    return torch.log(-torch.log1p(-u))
