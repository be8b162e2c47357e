"""sample() and prompt_logprobs(): logprob semantics (raw vs processed), top-k lists, ranks."""

from __future__ import annotations

import pytest
import torch

from rollout.samplers import (
    MAX_LOGPROBS,
    RowSampling,
    SamplingParams,
    SamplingTensors,
    prompt_logprobs,
    sample,
)

V = 16
NEG_INF = float("-inf")


def _tensors(
    params: list[SamplingParams], banned: list[tuple[int, ...]] | None = None, vocab: int = V
) -> SamplingTensors:
    banned = banned if banned is not None else [()] * len(params)
    rows = [RowSampling(p, 1000 + i, i, b) for i, (p, b) in enumerate(zip(params, banned, strict=True))]
    return SamplingTensors.build(rows, vocab, "cpu")


def _logits(b: int, v: int = V, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, v, generator=torch.Generator().manual_seed(seed)) * 2.0


def _gather(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return x.gather(1, ids[:, None]).squeeze(1)


def test_raw_logprob_is_log_softmax_of_the_logits_whatever_the_params() -> None:
    logits = _logits(64)
    params = [
        SamplingParams(
            temperature=0.3 + 0.05 * i, top_k=(i % 5) + 2, top_p=0.5 + i / 200, min_p=0.01 * (i % 3)
        )
        for i in range(64)
    ]
    out = sample(logits, _tensors(params))
    assert torch.allclose(out.logprobs, _gather(logits.log_softmax(-1), out.token_ids), atol=1e-6)
    assert out.topk_ids is None and out.topk_logprobs is None and out.ranks is None


def test_processed_logprob_includes_temperature() -> None:
    logits = _logits(32)
    out = sample(logits, _tensors([SamplingParams(temperature=0.5, logprobs_mode="processed")] * 32))
    expected = _gather((logits * 2.0).log_softmax(-1), out.token_ids)  # T = 0.5 doubles the logits
    assert torch.allclose(out.logprobs, expected, atol=1e-5)
    assert not torch.allclose(out.logprobs, _gather(logits.log_softmax(-1), out.token_ids), atol=1e-3)


def test_processed_top_k_masks_the_rest_to_minus_inf() -> None:
    logits = _logits(32)
    params = SamplingParams(top_k=4, temperature=0.8, logprobs=V, logprobs_mode="processed")
    out = sample(logits, _tensors([params] * 32))
    top4 = logits.topk(4, dim=-1)
    expected = (top4.values / 0.8).log_softmax(-1)
    assert out.topk_ids is not None and out.topk_logprobs is not None
    assert out.topk_ids.shape == (32, V)  # K = min(logprobs, V)
    assert torch.equal(out.topk_ids[:, :4], top4.indices)
    assert torch.allclose(out.topk_logprobs[:, :4], expected, atol=1e-5)
    assert torch.all(out.topk_logprobs[:, 4:] == NEG_INF)
    in_top4 = (out.token_ids[:, None] == top4.indices).any(-1)
    assert bool(in_top4.all())
    assert torch.allclose(out.logprobs, _gather(out.topk_logprobs, out.ranks - 1), atol=1e-6)


@pytest.mark.parametrize("with_top_p", [False, True], ids=["topk-path", "sort-path"])
def test_different_top_k_per_row_in_one_batch(with_top_p: bool) -> None:
    # Rows with different k (and one with top-k off) share one topk(max_k) or one sort.
    ks = [2, 5, -1, 9, 1, 3]
    top_p = 0.999999 if with_top_p else 1.0  # < 1 forces the sort path, keeps (nearly) everything
    params = [SamplingParams(top_k=k, top_p=top_p, logprobs=V, logprobs_mode="processed") for k in ks]
    logits = _logits(len(ks), seed=7)
    out = sample(logits, _tensors(params))
    kept = torch.isfinite(out.topk_logprobs).sum(-1).tolist()
    assert kept == [2, 5, V, 9, 1, 3]
    for r, k in enumerate(ks):
        allowed = logits[r].topk(k if k > 0 else V).indices
        assert bool((allowed == out.token_ids[r]).any())


def test_processed_matches_reference_with_all_filters() -> None:
    logits = _logits(8, seed=5)
    params = SamplingParams(
        temperature=0.7, top_k=9, top_p=0.8, min_p=0.05, logprobs_mode="processed", logprobs=V
    )
    out = sample(logits, _tensors([params] * 8))
    for r in range(8):
        x = logits[r].double() / 0.7
        x = torch.where(x >= x.topk(9).values[-1], x, NEG_INF)
        p = x.softmax(-1)
        order = p.argsort(descending=True)
        before = p[order].cumsum(0) - p[order]
        keep = torch.zeros(V, dtype=torch.bool)
        keep[order[before < 0.8]] = True
        x = torch.where(keep, x, NEG_INF)
        p = x.softmax(-1)
        x = torch.where(p >= 0.05 * p.max(), x, NEG_INF)
        expected = x.log_softmax(-1).float()
        got = torch.full((V,), NEG_INF)
        got[out.topk_ids[r]] = out.topk_logprobs[r]  # K = V: the whole distribution
        assert torch.equal(torch.isinf(got), torch.isinf(expected))
        finite = torch.isfinite(expected)
        assert torch.allclose(got[finite], expected[finite], atol=1e-5)


def test_top_logprobs_are_sorted_and_consistent_with_log_softmax() -> None:
    logits = _logits(16, v=100)
    params = [SamplingParams(logprobs=MAX_LOGPROBS if i % 2 else 3, temperature=1.1) for i in range(16)]
    out = sample(logits, _tensors(params, vocab=100))
    assert out.topk_ids is not None and out.topk_logprobs is not None and out.ranks is not None
    assert out.topk_ids.shape == out.topk_logprobs.shape == (16, MAX_LOGPROBS)
    assert out.topk_ids.dtype == torch.int64 and out.topk_logprobs.dtype == torch.float32
    assert torch.all(out.topk_logprobs[:, :-1] >= out.topk_logprobs[:, 1:])
    ref = logits.log_softmax(-1)
    assert torch.allclose(out.topk_logprobs, ref.gather(1, out.topk_ids), atol=1e-6)
    assert torch.equal(out.topk_ids, ref.topk(MAX_LOGPROBS, dim=-1).indices)
    expected_ranks = (ref > _gather(ref, out.token_ids)[:, None]).sum(-1) + 1
    assert torch.equal(out.ranks, expected_ranks)


def test_mixed_modes_in_one_batch() -> None:
    logits = _logits(2)
    raw = SamplingParams(temperature=0.5, top_k=3, logprobs=2)
    processed = raw.replace(logprobs_mode="processed")
    out = sample(logits, _tensors([raw, processed]))
    raw_ref = logits[0].log_softmax(-1)
    assert torch.allclose(out.logprobs[0], raw_ref[out.token_ids[0]], atol=1e-6)
    top3 = logits[1].topk(3)
    proc_ref = (top3.values * 2.0).log_softmax(-1)
    idx = (top3.indices == out.token_ids[1]).nonzero().item()
    assert torch.allclose(out.logprobs[1], proc_ref[idx], atol=1e-5)
    assert torch.allclose(out.topk_logprobs[1], proc_ref[:2], atol=1e-5)
    assert torch.allclose(out.topk_logprobs[0], raw_ref.topk(2).values, atol=1e-6)


def test_greedy_logprobs() -> None:
    logits = _logits(8)
    argmax = logits.argmax(-1)
    ref = _gather(logits.log_softmax(-1), argmax)
    for mode in ("raw", "processed"):
        out = sample(logits, _tensors([SamplingParams(temperature=0.0, logprobs=1, logprobs_mode=mode)] * 8))
        assert torch.equal(out.token_ids, argmax)
        assert torch.allclose(out.logprobs, ref, atol=1e-6)  # processed greedy: temperature 1
        assert torch.all(out.ranks == 1)
    # Processed greedy with top_k=2: the distribution over the two best tokens.
    out = sample(logits, _tensors([SamplingParams(temperature=0.0, top_k=2, logprobs_mode="processed")] * 8))
    assert torch.allclose(out.logprobs, logits.topk(2).values.log_softmax(-1)[:, 0], atol=1e-6)


def test_banned_tokens_raw_vs_processed() -> None:
    logits = _logits(4)
    argmax = logits.argmax(-1)
    banned = [(int(a),) for a in argmax]
    for mode in ("raw", "processed"):
        params = SamplingParams(temperature=0.0, logprobs=1, logprobs_mode=mode)
        out = sample(logits, _tensors([params] * 4, banned=banned))
        assert not torch.any(out.token_ids == argmax)
        if mode == "raw":  # the model's own distribution: the banned token keeps its logprob
            assert torch.equal(out.topk_ids[:, 0], argmax)
            assert torch.allclose(out.logprobs, _gather(logits.log_softmax(-1), out.token_ids), atol=1e-6)
        else:  # the distribution sampled from: the banned token is impossible
            assert torch.all(out.topk_ids[:, 0] == out.token_ids)
            masked = logits.scatter(1, argmax[:, None], NEG_INF)
            assert torch.allclose(out.logprobs, _gather(masked.log_softmax(-1), out.token_ids), atol=1e-6)


def test_logprobs_of_random_rows_match_their_draws_over_many_seeds() -> None:
    # The returned processed logprob is the log frequency of the token in repeated draws.
    n = 20_000
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).expand(n, -1)
    params = [SamplingParams(temperature=0.9, logprobs_mode="processed")] * n
    rows = [RowSampling(p, seed, 0) for seed, p in enumerate(params)]
    out = sample(logits, SamplingTensors.build(rows, 4, "cpu"))
    freq = torch.bincount(out.token_ids, minlength=4).double() / n
    lp = torch.full((4,), NEG_INF, dtype=torch.float64)
    lp[out.token_ids] = out.logprobs.double()
    assert torch.allclose(freq, lp.exp(), atol=0.012)


def test_prompt_logprobs() -> None:
    logits = _logits(12, v=50)
    next_ids = torch.randint(0, 50, (12,), generator=torch.Generator().manual_seed(9))
    lp, top_ids, top_lp = prompt_logprobs(logits, next_ids, 5)
    ref = logits.log_softmax(-1)
    assert torch.allclose(lp, _gather(ref, next_ids), atol=1e-6)
    assert top_ids.shape == top_lp.shape == (12, 5)
    assert torch.equal(top_ids, ref.topk(5).indices)
    assert torch.allclose(top_lp, ref.topk(5).values, atol=1e-6)
    lp0, ids0, vals0 = prompt_logprobs(logits.bfloat16(), next_ids, 0)
    assert ids0.shape == vals0.shape == (12, 0) and lp0.dtype == torch.float32


@pytest.mark.parametrize("k", [-1, MAX_LOGPROBS + 1, True, 2.0])
def test_prompt_logprobs_rejects_bad_k(k: object) -> None:
    with pytest.raises(ValueError, match="k must be"):
        prompt_logprobs(_logits(2), torch.zeros(2, dtype=torch.int64), k)  # type: ignore[arg-type]


def test_prompt_logprobs_rejects_bad_ids() -> None:
    with pytest.raises(ValueError, match="next_ids"):
        prompt_logprobs(_logits(2), torch.zeros(3, dtype=torch.int64), 1)
    with pytest.raises(ValueError, match="next_ids"):
        prompt_logprobs(_logits(2), torch.zeros(2, dtype=torch.int32), 1)
