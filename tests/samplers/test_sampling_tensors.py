"""SamplingTensors.build: effective per-row values, host flags, validation."""

from __future__ import annotations

import pytest
import torch

from rollout.samplers import RowSampling, SamplingParams, SamplingTensors, sample
from rollout.samplers.tensors import RowValues, effective_values

V = 50


def _row(seed: int = 0, offset: int = 0, banned: tuple[int, ...] = (), **params: object) -> RowSampling:
    return RowSampling(SamplingParams(**params), seed, offset, banned)


def test_values_dtypes_and_flags() -> None:
    rows = [
        _row(seed=1, offset=3, temperature=0.5, top_k=5, logprobs=2),
        _row(seed=2**64 - 1, temperature=0.0),  # greedy raw
        _row(seed=7, offset=9, top_p=0.8, min_p=0.1, logprobs_mode="processed", logprobs=4),
        _row(seed=-5, banned=(3, 49), top_k=0),
        _row(top_k=V + 10),
        _row(top_k=1, temperature=0.5, logprobs_mode="processed"),  # greedy: processed at T=1
    ]
    t = SamplingTensors.build(rows, V, "cpu")
    assert t.batch_size == 6 and t.vocab_size == V
    assert t.temperature.dtype == torch.float32 and t.temperature.tolist() == [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert t.greedy.tolist() == [False, True, False, False, False, True]
    assert t.top_k.dtype == torch.int32 and t.top_k.tolist() == [5, V, V, V, V, 1]  # 0 and > V are off
    assert t.top_p.tolist() == pytest.approx([1.0, 1.0, 0.8, 1.0, 1.0, 1.0])
    assert t.min_p.tolist() == pytest.approx([0.0, 0.0, 0.1, 0.0, 0.0, 0.0])
    assert t.seeds.dtype == torch.int64 and t.seeds.tolist() == [1, -1, 7, -5, 0, 0]  # 2**64-1 -> -1
    assert t.offsets.dtype == torch.int64 and t.offsets.tolist() == [3, 0, 9, 0, 0, 0]
    assert t.processed_mode.tolist() == [False, False, True, False, False, True]
    assert t.banned_rows.tolist() == [3, 3] and t.banned_tokens.tolist() == [3, 49]
    assert t.banned_rows.dtype == t.banned_tokens.dtype == torch.int64
    assert (t.all_greedy, t.any_greedy, t.any_top_k, t.max_top_k) == (False, True, True, 5)  # max of 5, 1
    assert (t.any_top_p, t.any_min_p, t.max_num_logprobs, t.any_processed) == (True, True, 4, True)


def test_greedy_raw_rows_do_no_filter_work() -> None:
    # A greedy row in raw mode never reads its processed distribution: its filters are dropped.
    rows = [_row(temperature=0.0, top_k=5, top_p=0.5, min_p=0.2), _row(top_k=1, top_p=0.3)]
    t = SamplingTensors.build(rows, V, "cpu")
    assert t.all_greedy and not (t.any_top_k or t.any_top_p or t.any_min_p)
    assert t.top_k.tolist() == [V, V]
    # In processed mode the same filters define the returned distribution, so they stay.
    t = SamplingTensors.build(
        [_row(temperature=0.0, top_k=5, top_p=0.5, logprobs_mode="processed")], V, "cpu"
    )
    assert t.any_top_k and t.any_top_p and t.top_k.tolist() == [5]
    assert t.temperature.tolist() == [1.0]


def test_no_flags_for_plain_sampling() -> None:
    t = SamplingTensors.build([_row(), _row(temperature=0.8)], V, "cpu")
    assert not (t.all_greedy or t.any_greedy or t.any_top_k or t.any_top_p or t.any_min_p or t.any_processed)
    assert (t.max_top_k, t.max_num_logprobs) == (0, 0)
    assert t.banned_rows.shape == (0,)


@pytest.mark.parametrize(
    ("row", "match"),
    [
        (_row(banned=(V,)), r"banned_token_ids.*50"),
        (_row(banned=(-1,)), r"banned_token_ids.*-1"),
        (_row(offset=-1), r"offset.*-1"),
        (_row(seed=2**64), r"seed.*18446744073709551616"),
        (RowSampling(SamplingParams(), 1.5, 0), r"seed.*1\.5"),  # type: ignore[arg-type]
        (RowSampling(SamplingParams(), 0, True), r"offset.*True"),  # type: ignore[arg-type]
    ],
)
def test_invalid_rows(row: RowSampling, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SamplingTensors.build([_row(), row], V, "cpu")


def test_invalid_arguments() -> None:
    with pytest.raises(TypeError, match="RowSampling"):
        SamplingTensors.build([SamplingParams()], V, "cpu")  # type: ignore[list-item]
    with pytest.raises(ValueError, match="vocab_size"):
        SamplingTensors.build([_row()], 0, "cpu")


def test_empty_batch() -> None:
    t = SamplingTensors.build([], V, torch.device("cpu"))
    assert t.batch_size == 0 and t.all_greedy
    out = sample(torch.zeros(0, V), t)
    assert out.token_ids.shape == (0,) and out.logprobs.shape == (0,)


_FIELDS = ("temperature", "greedy", "top_k", "top_p", "min_p", "seeds", "offsets", "processed_mode")


@pytest.mark.parametrize("batch", [1, 5, 16, 17, 40])
@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.7, top_k=7, top_p=0.9, min_p=0.05, logprobs=3),
        SamplingParams(temperature=0.0, logprobs_mode="processed", top_k=4),
        SamplingParams(),
    ],
)
def test_shared_row_values_broadcast_like_per_row_values(batch: int, params: SamplingParams) -> None:
    # from_columns fills rows that share one values tuple by broadcast, and distinct tuples row by
    # row: both must give the same tensors and flags, each per-row tensor 16-byte aligned.
    shared = effective_values(params, V)
    distinct = [RowValues(*shared) for _ in range(batch)]  # equal values, one object per row
    assert len({id(v) for v in distinct}) == batch
    seeds, offsets = [3 * i + 1 for i in range(batch)], list(range(batch))
    bans = ([0, batch - 1], [2, 4])
    cpu = torch.device("cpu")
    one = SamplingTensors.from_columns([shared] * batch, seeds, offsets, *bans, V, cpu)
    many = SamplingTensors.from_columns(distinct, seeds, offsets, *bans, V, cpu)
    for name in (*_FIELDS, "banned_rows", "banned_tokens"):
        a, b = getattr(one, name), getattr(many, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
        assert a.data_ptr() % 16 == 0, name
    for flag in ("all_greedy", "any_greedy", "any_top_k", "max_top_k", "any_top_p", "any_min_p"):
        assert getattr(one, flag) == getattr(many, flag), flag
    assert one.max_num_logprobs == many.max_num_logprobs == (params.logprobs or 0)
    assert one.top_k.tolist() == [shared.top_k] * batch and one.seeds.tolist() == seeds
    assert (one.banned_rows.tolist(), one.banned_tokens.tolist()) == bans


def test_penalty_history_columns_and_validation() -> None:
    rows = [
        RowSampling(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), 1, 0, (), (3, 3, 7), (1,)),
        RowSampling(SamplingParams(), 2, 0, (), (5, 5), (6,)),  # no penalties: its history is not read
        RowSampling(SamplingParams(repetition_penalty=1.5), 3, 0, (), (4,), (9, 9, 2)),
    ]
    p = SamplingTensors.build(rows, V, "cpu").penalties
    assert p is not None
    assert p.presence.tolist() == [0.5, 0.0, 0.0] and p.frequency.tolist() == [0.25, 0.0, 0.0]
    assert p.repetition.tolist() == [1.0, 1.0, 1.5]
    counts = {(r, c): int(p.output_counts[r, c]) for r, c in p.output_counts.nonzero().tolist()}
    assert counts == {(0, 3): 2, (0, 7): 1, (2, 4): 1}
    assert p.seen is not None and p.seen[2].nonzero().flatten().tolist() == [2, 4, 9]
    assert not p.seen[1].any()
    p.add_output_tokens(torch.tensor([1, 2]), torch.tensor([8, 4]))  # tokens still on the device
    assert int(p.output_counts[1, 8]) == 1 and int(p.output_counts[2, 4]) == 2 and bool(p.seen[1, 8])
    # no penalties: no history tensors at all; an id outside the vocabulary is refused by name
    assert SamplingTensors.build([rows[1]], V, "cpu").penalties is None
    bad = RowSampling(SamplingParams(frequency_penalty=1.0), 1, 0, (), (V,))
    with pytest.raises(ValueError, match=r"output_token_ids.*50"):
        SamplingTensors.build([bad], V, "cpu")


def test_penalties_move_the_processed_distribution_not_the_raw_one() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, V, generator=gen) * 3
    history = (int(logits[0].argmax()),) * 2  # the top token, output twice
    params = [
        SamplingParams(
            temperature=0.0, frequency_penalty=2.0, presence_penalty=1.0, logprobs_mode="processed"
        ),
        SamplingParams(temperature=0.0, repetition_penalty=4.0, logprobs_mode="processed"),
        SamplingParams(temperature=0.0, frequency_penalty=2.0),  # raw logprobs
    ]
    rows = [RowSampling(p, 0, 2, (), history, history) for p in params]
    out = sample(logits, SamplingTensors.build(rows, V, "cpu"))
    expected = logits.clone()
    top = history[0]
    expected[0, top] -= 2.0 * 2 + 1.0
    expected[1, top] = expected[1, top] / 4.0 if expected[1, top] > 0 else expected[1, top] * 4.0
    expected[2, top] -= 2.0 * 2
    assert out.token_ids.tolist() == expected.argmax(dim=-1).tolist()
    assert out.token_ids[0] != top  # a penalty large enough to move the argmax
    processed = torch.log_softmax(expected, dim=-1)
    raw = torch.log_softmax(logits, dim=-1)
    for i, source in enumerate((processed, processed, raw)):
        assert out.logprobs[i].item() == pytest.approx(source[i, out.token_ids[i]].item(), abs=1e-5)


def test_logit_bias_moves_the_processed_distribution_not_the_raw_one() -> None:
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(3, V, generator=gen)
    params = [
        SamplingParams(temperature=0.0, logit_bias={7: 100.0}, logprobs_mode="processed"),
        SamplingParams(temperature=0.0),  # no bias: untouched by the other rows'
        SamplingParams(temperature=0.5, seed=1, logit_bias={3: 5.0, 9: -100.0}),  # raw logprobs
    ]
    rows = [RowSampling(p, i, 0) for i, p in enumerate(params)]
    t = SamplingTensors.build(rows, V, "cpu")
    assert t.logit_bias is not None
    assert [x.tolist() for x in t.logit_bias] == [[0, 2, 2], [7, 3, 9], [100.0, 5.0, -100.0]]
    out = sample(logits, t)
    assert out.token_ids[0] == 7 and out.token_ids[1] == logits[1].argmax()
    biased = logits[0].clone()
    biased[7] += 100.0
    assert out.logprobs[0].item() == pytest.approx(torch.log_softmax(biased, -1)[7].item(), abs=1e-5)
    assert out.logprobs[2].item() == pytest.approx(torch.log_softmax(logits[2], -1)[out.token_ids[2]].item())
    assert SamplingTensors.build([rows[1]], V, "cpu").logit_bias is None
    with pytest.raises(ValueError, match=r"logit_bias token.*50"):
        SamplingTensors.build([RowSampling(SamplingParams(logit_bias={V: 1.0}), 0, 0)], V, "cpu")
