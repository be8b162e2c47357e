"""The counter-based hash RNG: determinism, range, uniformity, independence.

All numbers are a deterministic function of (seed, offset, index), so these tests are deterministic
too; the statistical thresholds make them meaningful (a broken mixer fails them, see the negative
controls at the bottom) rather than flaky.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rollout.samplers.rng import log_exponential, mix32, random_bits, row_keys, uniform


def _i64(values: list[int] | range) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.int64)


def _ks_statistic(u: np.ndarray) -> float:
    """Kolmogorov-Smirnov distance between the sample and U(0, 1)."""
    u = np.sort(u.astype(np.float64))
    n = u.size
    ranks = np.arange(1, n + 1) / n
    return float(max(np.max(ranks - u), np.max(u - (ranks - 1.0 / n))))


def _ks_critical(n: int) -> float:
    return 1.95 / math.sqrt(n)  # alpha ~ 0.001


def _chi2_critical(df: int, z: float = 4.0) -> float:
    """Wilson-Hilferty upper quantile of chi-square(df) at standard-normal z (z=4: p ~ 3e-5)."""
    c = 2.0 / (9.0 * df)
    return df * (1.0 - c + z * math.sqrt(c)) ** 3


def _pair_chi2(a: np.ndarray, b: np.ndarray, bins: int = 16) -> float:
    """Chi-square of the joint histogram of (a, b) against independent uniforms."""
    ia = np.minimum((a * bins).astype(np.int64), bins - 1)
    ib = np.minimum((b * bins).astype(np.int64), bins - 1)
    counts = np.bincount(ia * bins + ib, minlength=bins * bins)
    expected = a.size / bins**2
    return float(((counts - expected) ** 2 / expected).sum())


def test_deterministic_and_independent_of_batch_composition() -> None:
    seeds, offsets = _i64([3, 99, -7, 2**62]), _i64([0, 5, 12, 2**40])
    bits = random_bits(seeds, offsets, 257)
    assert bits.dtype == torch.int64 and bits.shape == (4, 257)
    assert torch.equal(bits, random_bits(seeds, offsets, 257))
    # Each row on its own, and in reverse order inside a different batch, gives the same numbers.
    for r in range(4):
        assert torch.equal(random_bits(seeds[r : r + 1], offsets[r : r + 1], 257)[0], bits[r])
    mixed = random_bits(torch.cat([_i64([1]), seeds.flip(0)]), torch.cat([_i64([0]), offsets.flip(0)]), 257)
    assert torch.equal(mixed[1:].flip(0), bits)
    # A wider vocabulary only appends columns.
    assert torch.equal(random_bits(seeds, offsets, 300)[:, :257], bits)


def test_known_values_pin_the_stream() -> None:
    # Changing the hash changes every seeded rollout: this pins the bits so it cannot happen silently.
    bits = random_bits(_i64([0, 1]), _i64([0, 0]), 3).tolist()
    assert bits == [[1083899769, 3745173036, 741155333], [3976090012, 1246536653, 727424383]]


def test_range_and_open_interval() -> None:
    bits = random_bits(_i64(range(64)), _i64(range(64)), 4096)
    assert int(bits.min()) >= 0 and int(bits.max()) < 2**32
    u = uniform(_i64(range(64)), _i64(range(64)), 4096)
    assert u.dtype == torch.float32 and float(u.min()) > 0.0 and float(u.max()) < 1.0
    log_e = log_exponential(_i64(range(64)), _i64(range(64)), 4096)
    assert torch.isfinite(log_e).all()


def test_log_exponential_is_exp1() -> None:
    # If E ~ Exp(1) then 1 - exp(-E) ~ U(0, 1).
    seeds = torch.arange(1024, dtype=torch.int64)
    e = log_exponential(seeds, seeds * 3, 1024).double().exp()
    u = (-torch.expm1(-e)).flatten().numpy()
    assert _ks_statistic(u) < _ks_critical(u.size)
    assert abs(float(e.mean()) - 1.0) < 5 / math.sqrt(e.numel())  # Exp(1) has mean 1, sd 1


def test_mixer_is_a_bijection_on_a_large_range() -> None:
    x = torch.arange(1 << 20, dtype=torch.int64)
    assert torch.unique(mix32(x)).numel() == 1 << 20
    assert torch.unique(mix32(x << 12)).numel() == 1 << 20  # inputs differing only in high bits


def test_uniformity_and_bit_balance() -> None:
    # 1024 (seed, offset) rows x 1024 vocab columns = 2**20 numbers.
    seeds = _i64(range(1024))
    offsets = _i64([i % 17 for i in range(1024)])
    bits = random_bits(seeds, offsets, 1024).flatten()
    n = bits.numel()
    ones = torch.stack([((bits >> b) & 1).sum() for b in range(32)]).double() / n
    assert float((ones - 0.5).abs().max()) < 5 * 0.5 / math.sqrt(n)
    u = uniform(seeds, offsets, 1024).flatten().numpy()
    assert _ks_statistic(u) < _ks_critical(n)
    counts = np.bincount((u * 1000).astype(np.int64), minlength=1000)
    assert float(((counts - n / 1000) ** 2 / (n / 1000)).sum()) < _chi2_critical(999)


@pytest.mark.parametrize("axis", ["index", "offset", "seed"])
def test_no_correlation_between_neighbours(axis: str) -> None:
    n_rows, n_cols = 512, 512
    base = torch.arange(n_rows, dtype=torch.int64) * 1_000_003
    if axis == "index":
        u = uniform(base, torch.zeros(n_rows, dtype=torch.int64), n_cols + 1).numpy().astype(np.float64)
        a, b = u[:, :-1].ravel(), u[:, 1:].ravel()
    elif axis == "offset":
        a = uniform(base, torch.zeros(n_rows, dtype=torch.int64), n_cols).numpy().astype(np.float64).ravel()
        b = uniform(base, torch.ones(n_rows, dtype=torch.int64), n_cols).numpy().astype(np.float64).ravel()
    else:
        off = torch.full((n_rows,), 4, dtype=torch.int64)
        a = uniform(base, off, n_cols).numpy().astype(np.float64).ravel()
        b = uniform(base + 1, off, n_cols).numpy().astype(np.float64).ravel()
    n = a.size
    assert abs(np.corrcoef(a, b)[0, 1]) < 5 / math.sqrt(n)
    assert _pair_chi2(a, b) < _chi2_critical(255)
    assert not np.array_equal(a, b)


def test_row_keys_differ_for_neighbouring_inputs() -> None:
    keys = row_keys(_i64([0, 1, 0, 0, 2**32, -1]), _i64([0, 0, 1, 2**32, 0, 0]))
    assert torch.unique(keys).numel() == 6


def test_negative_controls_are_rejected() -> None:
    """The statistics above reject generators that are visibly broken."""
    n_rows, n_cols = 512, 512
    # (1) A weak "hash": key + index with no mixing per element -> adjacent columns are correlated.
    keys = row_keys(torch.arange(n_rows, dtype=torch.int64), torch.zeros(n_rows, dtype=torch.int64))
    weak = ((keys[:, None] + torch.arange(n_cols + 1)) & 0xFFFFFFFF).double() / 2**32
    a, b = weak[:, :-1].numpy().ravel(), weak[:, 1:].numpy().ravel()
    assert _pair_chi2(a, b) > _chi2_critical(255)
    # (2) A skewed distribution (u**1.01) fails the KS test at this sample size.
    u = uniform(torch.arange(1024, dtype=torch.int64), torch.zeros(1024, dtype=torch.int64), 1024)
    skewed = u.flatten().double().numpy() ** 1.01
    assert _ks_statistic(skewed) > _ks_critical(skewed.size)
