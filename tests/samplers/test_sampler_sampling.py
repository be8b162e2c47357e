"""sample(): which tokens come out. Greedy, reproducibility, and distributions under each filter.

Distribution tests draw one token from each of N rows that share the logits but not the seed, and
compare the counts with an independent float64 reference of the processed distribution by a
chi-square test. The RNG is counter-based, so the tests are deterministic.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rollout.samplers import RowSampling, SamplingParams, SamplingTensors, sample

N_DRAWS = 20_000
LOGITS10 = torch.tensor([1.2, -0.3, 0.5, 2.0, -1.0, 0.9, 0.1, -0.6, 1.6, 0.3])  # distinct values


def _tensors(
    params: list[SamplingParams],
    seeds: list[int] | None = None,
    offsets: list[int] | None = None,
    banned: list[tuple[int, ...]] | None = None,
    vocab: int = 10,
) -> SamplingTensors:
    n = len(params)
    seeds = seeds if seeds is not None else list(range(n))
    offsets = offsets if offsets is not None else [0] * n
    banned = banned if banned is not None else [()] * n
    rows = [RowSampling(p, s, o, b) for p, s, o, b in zip(params, seeds, offsets, banned, strict=True)]
    return SamplingTensors.build(rows, vocab, "cpu")


def reference_probs(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int = -1, top_p: float = 1.0, min_p: float = 0.0
) -> np.ndarray:
    """The processed distribution, written directly from the definitions, in float64."""
    x = logits.double().numpy() / temperature
    if top_k > 0:
        x = np.where(x >= np.sort(x)[::-1][top_k - 1], x, -np.inf)
    p = np.exp(x - x.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p)
        mass_before = np.cumsum(p[order]) - p[order]
        keep = np.zeros_like(p, dtype=bool)
        keep[order[mass_before < top_p]] = True
        p = np.where(keep, p, 0.0)
        p /= p.sum()
    if min_p > 0.0:
        p = np.where(p >= min_p * p.max(), p, 0.0)
        p /= p.sum()
    return p


def chi2_critical(df: int, z: float = 4.0) -> float:
    """Wilson-Hilferty upper quantile of chi-square(df) at standard-normal z (z=4: p ~ 3e-5)."""
    c = 2.0 / (9.0 * df)
    return df * (1.0 - c + z * math.sqrt(c)) ** 3


def chi2(counts: np.ndarray, probs: np.ndarray) -> float:
    """Chi-square statistic of counts against probs; any count outside the support is infinite."""
    support = probs > 0
    if counts[~support].any():
        return math.inf
    expected = probs[support] * counts.sum()
    return float(((counts[support] - expected) ** 2 / expected).sum())


def draw_counts(
    params: SamplingParams, logits: torch.Tensor = LOGITS10, n: int = N_DRAWS, **kw: object
) -> np.ndarray:
    t = _tensors([params] * n, **kw)  # type: ignore[arg-type]
    tokens = sample(logits.expand(n, -1), t).token_ids
    return np.bincount(tokens.numpy(), minlength=logits.numel())


def test_greedy_is_argmax() -> None:
    logits = torch.randn(64, 1000, generator=torch.Generator().manual_seed(0))
    out = sample(logits, _tensors([SamplingParams(temperature=0.0)] * 64, vocab=1000))
    assert torch.equal(out.token_ids, logits.argmax(-1))
    # top_k == 1 is greedy too, whatever the temperature.
    out = sample(logits, _tensors([SamplingParams(top_k=1, temperature=1.7)] * 64, vocab=1000))
    assert torch.equal(out.token_ids, logits.argmax(-1))


def test_greedy_and_random_rows_mixed() -> None:
    logits = torch.randn(64, 1000, generator=torch.Generator().manual_seed(1)) * 0.1  # flat: draws vary
    params = [
        SamplingParams(temperature=0.0) if i % 2 == 0 else SamplingParams(temperature=1.0) for i in range(64)
    ]
    out = sample(logits, _tensors(params, vocab=1000))
    greedy_rows = torch.arange(0, 64, 2)
    assert torch.equal(out.token_ids[greedy_rows], logits[greedy_rows].argmax(-1))
    random_rows = torch.arange(1, 64, 2)
    assert (out.token_ids[random_rows] != logits[random_rows].argmax(-1)).sum() > 20
    # The random rows draw exactly what they draw in an all-random batch.
    alone = sample(logits[random_rows], _tensors(params[1::2], seeds=list(range(1, 64, 2)), vocab=1000))
    assert torch.equal(alone.token_ids, out.token_ids[random_rows])


def test_same_seed_and_offset_give_same_token_in_any_batch() -> None:
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 500, generator=gen)
    params = [
        SamplingParams(temperature=0.9),
        SamplingParams(temperature=1.3, top_k=50),
        SamplingParams(top_p=0.8, logprobs=3),
        SamplingParams(temperature=0.0),
        SamplingParams(min_p=0.05, logprobs_mode="processed"),
        SamplingParams(temperature=0.7, top_k=20, top_p=0.9, min_p=0.01),
    ]
    seeds, offsets = [11, 22, 33, 44, 55, 66], [0, 7, 3, 1, 100, 2]
    full = sample(logits, _tensors(params, seeds, offsets, vocab=500))
    for r in range(6):  # each row alone (a preempted request resumed in another batch)
        alone = sample(logits[r : r + 1], _tensors([params[r]], [seeds[r]], [offsets[r]], vocab=500))
        assert int(alone.token_ids[0]) == int(full.token_ids[r])
        assert torch.allclose(alone.logprobs[0], full.logprobs[r])
    perm = [4, 2, 0, 5, 3, 1]  # reversed positions, different neighbours
    shuffled = sample(
        logits[perm],
        _tensors([params[i] for i in perm], [seeds[i] for i in perm], [offsets[i] for i in perm], vocab=500),
    )
    assert torch.equal(shuffled.token_ids, full.token_ids[perm])


def test_different_seeds_or_offsets_give_different_draws() -> None:
    logits = torch.zeros(200, 1000)  # uniform: 200 draws should be nearly all distinct
    p = [SamplingParams()] * 200
    by_seed = sample(logits, _tensors(p, seeds=list(range(200)), vocab=1000)).token_ids
    by_offset = sample(logits, _tensors(p, seeds=[5] * 200, offsets=list(range(200)), vocab=1000)).token_ids
    assert torch.unique(by_seed).numel() > 170
    assert torch.unique(by_offset).numel() > 170
    assert (by_seed != by_offset).sum() > 170


def test_unseeded_stream_over_offsets_matches_softmax() -> None:
    # One request over many steps (offsets) samples the right distribution, not just many seeds.
    counts = draw_counts(SamplingParams(temperature=0.8), seeds=[123] * N_DRAWS, offsets=list(range(N_DRAWS)))
    assert chi2(counts, reference_probs(LOGITS10, 0.8)) < chi2_critical(9)


@pytest.mark.parametrize("temperature", [1.0, 0.5, 0.7, 2.0])
def test_distribution_matches_softmax_over_temperature(temperature: float) -> None:
    counts = draw_counts(SamplingParams(temperature=temperature))
    assert chi2(counts, reference_probs(LOGITS10, temperature)) < chi2_critical(9)
    # The same statistic rejects a sampler that ignored the temperature (or used another one).
    wrong = 1.0 if temperature != 1.0 else 1.5
    assert chi2(counts, reference_probs(LOGITS10, wrong)) > chi2_critical(9)


@pytest.mark.parametrize("top_k", [1, 3, 6])
def test_top_k(top_k: int) -> None:
    counts = draw_counts(SamplingParams(top_k=top_k, temperature=1.5))
    allowed = set(torch.topk(LOGITS10, top_k).indices.tolist())
    assert set(np.flatnonzero(counts).tolist()) <= allowed
    probs = reference_probs(LOGITS10, 1.5, top_k=top_k)
    if top_k > 1:
        assert chi2(counts, probs) < chi2_critical(top_k - 1)
        # Renormalization matters: the unfiltered distribution is rejected.
        assert chi2(counts, reference_probs(LOGITS10, 1.5)) > chi2_critical(top_k - 1)
    else:
        assert counts[int(LOGITS10.argmax())] == N_DRAWS


@pytest.mark.parametrize("top_p", [0.3, 0.62, 0.9])
def test_top_p(top_p: float) -> None:
    counts = draw_counts(SamplingParams(top_p=top_p))
    probs = reference_probs(LOGITS10, top_p=top_p)
    nucleus = set(np.flatnonzero(probs).tolist())
    assert set(np.flatnonzero(counts).tolist()) <= nucleus
    # Smallest set reaching top_p: dropping its least likely member would fall below top_p.
    full = reference_probs(LOGITS10)
    kept = sorted(nucleus, key=lambda i: -full[i])
    assert full[kept].sum() >= top_p > full[kept[:-1]].sum()
    if len(nucleus) > 1:
        assert chi2(counts, probs) < chi2_critical(len(nucleus) - 1)


@pytest.mark.parametrize("top_p", [1e-300, 1e-44, 1e-30])
def test_tiny_top_p_keeps_the_top_token(top_p: float) -> None:
    """A top_p that float32 rounds to 0 (or whose product with the top-k mass does) still keeps the
    most likely token: every draw is the argmax (it crashed the sampler: no token kept)."""
    counts = draw_counts(SamplingParams(top_p=top_p), n=200)
    assert counts[int(LOGITS10.argmax())] == 200
    counts = draw_counts(SamplingParams(top_p=top_p, top_k=4), n=200)
    assert counts[int(LOGITS10.argmax())] == 200


def test_top_p_applies_to_the_top_k_renormalized_distribution() -> None:
    # probs 0.4/0.3/0.2/0.1: top_k=3 renormalizes to .444/.333/.222, whose 0.75-nucleus is 2 tokens
    # (on the unrenormalized distribution it would be 3).
    logits = torch.tensor([0.4, 0.3, 0.2, 0.1]).log()
    counts = draw_counts(SamplingParams(top_k=3, top_p=0.75), logits=logits, n=4000, vocab=4)
    assert counts[2] == 0 and counts[3] == 0 and counts[0] > 0 and counts[1] > 0
    assert chi2(counts, reference_probs(logits, top_k=3, top_p=0.75)) < chi2_critical(1)


@pytest.mark.parametrize("min_p", [0.1, 0.35, 1.0])
def test_min_p(min_p: float) -> None:
    counts = draw_counts(SamplingParams(min_p=min_p, temperature=1.2))
    probs = reference_probs(LOGITS10, 1.2, min_p=min_p)
    full = reference_probs(LOGITS10, 1.2)
    assert set(np.flatnonzero(probs).tolist()) == set(np.flatnonzero(full >= min_p * full.max()).tolist())
    assert set(np.flatnonzero(counts).tolist()) <= set(np.flatnonzero(probs).tolist())
    support = int((probs > 0).sum())
    if support > 1:
        assert chi2(counts, probs) < chi2_critical(support - 1)


def test_all_filters_together() -> None:
    params = SamplingParams(temperature=0.8, top_k=7, top_p=0.9, min_p=0.08)
    counts = draw_counts(params)
    probs = reference_probs(LOGITS10, 0.8, top_k=7, top_p=0.9, min_p=0.08)
    assert chi2(counts, probs) < chi2_critical(int((probs > 0).sum()) - 1)


def test_mixed_filter_rows_in_one_batch_match_their_own_distributions() -> None:
    # Two kinds of rows interleaved: each one's counts follow its own params, not the batch's.
    n = N_DRAWS
    a, b = SamplingParams(top_k=3), SamplingParams(top_p=0.5, temperature=0.6)
    t = _tensors([a if i % 2 == 0 else b for i in range(n)])
    tokens = sample(LOGITS10.expand(n, -1), t).token_ids.numpy()
    counts_a = np.bincount(tokens[0::2], minlength=10)
    counts_b = np.bincount(tokens[1::2], minlength=10)
    assert chi2(counts_a, reference_probs(LOGITS10, top_k=3)) < chi2_critical(2)
    probs_b = reference_probs(LOGITS10, 0.6, top_p=0.5)
    assert chi2(counts_b, probs_b) < chi2_critical(max(int((probs_b > 0).sum()) - 1, 1))


def test_banned_tokens_are_never_sampled() -> None:
    banned = (3, 8, 0)  # the three most likely tokens
    counts = draw_counts(SamplingParams(temperature=1.0), banned=[banned] * N_DRAWS)
    assert counts[list(banned)].sum() == 0
    probs = reference_probs(LOGITS10)
    probs[list(banned)] = 0.0
    assert chi2(counts, probs / probs.sum()) < chi2_critical(6)
    # Greedy with the argmax banned takes the next best.
    t = _tensors([SamplingParams(temperature=0.0)], banned=[(3,)])
    assert int(sample(LOGITS10[None], t).token_ids[0]) == 8


def test_input_logits_are_not_modified() -> None:
    logits = torch.randn(4, 10, generator=torch.Generator().manual_seed(3))
    before = logits.clone()
    for params in (SamplingParams(temperature=0.0), SamplingParams(top_p=0.5, min_p=0.1, top_k=4)):
        sample(logits, _tensors([params] * 4, banned=[(1, 2)] * 4))
        assert torch.equal(logits, before)


def test_low_precision_logits() -> None:
    logits = torch.randn(8, 300, generator=torch.Generator().manual_seed(4))
    t = _tensors([SamplingParams(temperature=0.9, top_p=0.95)] * 8, vocab=300)
    out_bf16 = sample(logits.bfloat16(), t)
    out_fp32 = sample(logits.bfloat16().float(), t)
    assert out_bf16.logprobs.dtype == torch.float32
    assert torch.equal(out_bf16.token_ids, out_fp32.token_ids)


def test_shape_mismatch_is_rejected() -> None:
    t = _tensors([SamplingParams()] * 2)
    with pytest.raises(ValueError, match="does not match"):
        sample(torch.zeros(3, 10), t)
    with pytest.raises(ValueError, match="does not match"):
        sample(torch.zeros(2, 11), t)
    with pytest.raises(ValueError, match="2-D float"):
        sample(torch.zeros(2, 10, dtype=torch.int64), t)
