"""SamplingParams: validation at the edge, immutability, dict round trips."""

from __future__ import annotations

import dataclasses
import math
import re

import msgpack
import numpy as np
import pytest

from rollout.samplers.params import MAX_LOGPROBS, SamplingParams

BAD_VALUES = [
    ("n", 0),
    ("n", -3),
    ("n", 1.5),
    ("n", True),
    ("temperature", -0.1),
    ("temperature", math.nan),
    ("temperature", math.inf),
    ("temperature", "1.0"),
    ("temperature", False),
    ("top_p", 0.0),
    ("top_p", -0.5),
    ("top_p", 1.01),
    ("top_p", math.nan),
    ("top_k", -2),
    ("top_k", 2.0),
    ("top_k", 2**64),  # int fields are int64 (msgpack refused these after the request was queued)
    ("max_tokens", 2**70),
    ("n", 2**63),
    ("stop_token_ids", [2**64]),
    ("min_p", -0.01),
    ("min_p", 1.5),
    ("min_p", math.nan),
    ("max_tokens", 0),
    ("max_tokens", None),
    ("min_tokens", -1),
    ("min_tokens", 2**63),
    ("logprobs", -1),
    ("logprobs", MAX_LOGPROBS + 1),
    ("logprobs", True),
    ("logprobs", 2.0),
    ("prompt_logprobs", -1),
    ("prompt_logprobs", MAX_LOGPROBS + 1),
    ("stop_token_ids", [-1]),
    ("stop_token_ids", [3, 1.0]),
    ("stop_token_ids", "12"),
    ("stop_token_ids", 7),
    ("stop", [""]),
    ("stop", ["ok", 3]),
    ("stop", 5),
    ("logprobs_mode", "logits"),
    ("logprobs_mode", None),
    ("seed", 1.5),
    ("seed", 2**64),
    ("seed", -(2**63) - 1),
    ("seed", True),
    ("ignore_eos", 1),
    ("detokenize", "yes"),
    ("skip_special_tokens", None),
    ("include_stop_str_in_output", 0),
    ("presence_penalty", 2.5),
    ("presence_penalty", "1"),
    ("frequency_penalty", -2.01),
    ("frequency_penalty", math.inf),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.0),
    ("repetition_penalty", math.nan),
    ("repetition_penalty", 1e-40),  # x / 1e-40 overflows float32: NaN logprobs
    ("repetition_penalty", 1e39),
]


@pytest.mark.parametrize(("field", "value"), BAD_VALUES, ids=[f"{f}={v!r}" for f, v in BAD_VALUES])
def test_bad_value_raises_value_error_naming_field_and_value(field: str, value: object) -> None:
    with pytest.raises(ValueError) as info:
        SamplingParams(**{field: value})
    message = str(info.value)
    assert field in message
    # The offending value (or, for a list, its bad element) appears in the message.
    shown = value[-1] if isinstance(value, list) else value
    assert repr(shown) in message or repr(value) in message, message


def test_min_tokens_above_max_tokens() -> None:
    with pytest.raises(ValueError, match=r"min_tokens.*max_tokens \(4\).*got 5"):
        SamplingParams(max_tokens=4, min_tokens=5)
    assert SamplingParams(max_tokens=4, min_tokens=4).min_tokens == 4


def test_unknown_field_is_a_value_error_naming_it() -> None:
    with pytest.raises(ValueError, match="foo"):
        SamplingParams(foo=1)
    with pytest.raises(ValueError, match="best_of"):
        SamplingParams.from_dict({"temperature": 0.5, "best_of": 2})


def test_defaults() -> None:
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_k, p.top_p, p.min_p, p.seed) == (1, 1.0, -1, 1.0, 0.0, None)
    assert (p.max_tokens, p.min_tokens, p.stop, p.stop_token_ids) == (16, 0, (), ())
    assert (p.logprobs, p.prompt_logprobs, p.logprobs_mode) == (None, None, "raw")
    assert (p.ignore_eos, p.include_stop_str_in_output, p.skip_special_tokens, p.detokenize) == (
        False,
        False,
        True,
        True,
    )
    assert SamplingParams.max_logprobs == MAX_LOGPROBS == 20


def test_boundary_values_are_accepted() -> None:
    p = SamplingParams(
        temperature=0,
        top_p=1,
        top_k=0,
        min_p=1.0,
        logprobs=MAX_LOGPROBS,
        prompt_logprobs=0,
        seed=2**64 - 1,
        logprobs_mode="processed",
    )
    assert isinstance(p.temperature, float) and isinstance(p.top_p, float)
    assert SamplingParams(seed=-(2**63)).seed == -(2**63)
    # The largest ints accepted still travel in the engine's messages (msgpack: int64 / uint64).
    big = SamplingParams(
        n=2**63 - 1, top_k=2**63 - 1, max_tokens=2**63 - 1, min_tokens=2**63 - 1,
        stop_token_ids=[2**63 - 1], logit_bias={2**63 - 1: 1.0}, seed=2**64 - 1,
    )  # fmt: skip
    assert SamplingParams.from_dict(msgpack.unpackb(msgpack.packb(big.to_dict()))) == big


def test_numpy_scalars_are_normalized_to_python_types() -> None:
    p = SamplingParams(n=np.int64(3), temperature=np.float32(0.5), stop_token_ids=[np.int32(7)])
    assert p.n == 3 and type(p.n) is int
    assert type(p.temperature) is float
    assert p.stop_token_ids == (7,) and type(p.stop_token_ids[0]) is int


def test_stop_str_is_wrapped_and_lists_become_tuples() -> None:
    p = SamplingParams(stop="###", stop_token_ids=[5, 6])
    assert p.stop == ("###",)
    assert p.stop_token_ids == (5, 6)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")


def test_frozen_and_hashable() -> None:
    p = SamplingParams(n=2, stop=["x"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.n = 3  # type: ignore[misc]
    assert p == SamplingParams(n=2, stop="x")
    assert hash(p) == hash(SamplingParams(n=2, stop="x"))


def test_replace_returns_a_validated_copy() -> None:
    p = SamplingParams(temperature=0.7, stop=["x"])
    q = p.replace(n=4, top_p=0.9)
    assert (q.n, q.top_p, q.temperature, q.stop) == (4, 0.9, 0.7, ("x",))
    assert (p.n, p.top_p) == (1, 1.0)
    with pytest.raises(ValueError, match=re.escape("top_p") + ".*" + re.escape("0.0")):
        p.replace(top_p=0.0)
    with pytest.raises(ValueError, match="bogus"):
        p.replace(bogus=1)


def test_from_dict_round_trip_and_errors() -> None:
    p = SamplingParams(n=2, temperature=0.3, stop=["\n\n"], stop_token_ids=[2], logprobs=5, seed=11)
    d = p.to_dict()
    assert d["stop"] == ["\n\n"] and d["stop_token_ids"] == [2]
    assert SamplingParams.from_dict(d) == p
    assert SamplingParams.from_dict({"max_tokens": 64, "stop": "END"}).stop == ("END",)
    with pytest.raises(ValueError, match="mapping"):
        SamplingParams.from_dict([("n", 1)])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="strings"):
        SamplingParams.from_dict({1: 2})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match=r"temperature.*-1\.0"):
        SamplingParams.from_dict({"temperature": -1.0})


@pytest.mark.parametrize(
    ("kwargs", "greedy"),
    [
        ({"temperature": 0.0}, True),
        ({"temperature": 1e-7}, True),
        ({"top_k": 1, "temperature": 1.5}, True),
        ({"temperature": 0.01}, False),
        ({"top_k": 2}, False),
        ({}, False),
    ],
)
def test_is_greedy(kwargs: dict, greedy: bool) -> None:
    assert SamplingParams(**kwargs).is_greedy is greedy


def test_penalties_and_logit_bias() -> None:
    p = SamplingParams()
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty, p.logit_bias) == (
        0.0,
        0.0,
        1.0,
        (),
    )
    assert not p.has_penalties
    assert SamplingParams(repetition_penalty=1.1).has_penalties
    assert SamplingParams(presence_penalty=-2, frequency_penalty=2).has_penalties
    # a mapping or pairs, kept as pairs sorted by token; they survive the dict round trip (as pairs,
    # since msgpack map keys must be strings)
    q = SamplingParams(logit_bias={9: -100, 2: 0.5})
    assert (
        q.logit_bias == ((2, 0.5), (9, -100.0)) == SamplingParams(logit_bias=[(9, -100), [2, 0.5]]).logit_bias
    )
    assert q.to_dict()["logit_bias"] == [[2, 0.5], [9, -100.0]]
    assert SamplingParams.from_dict({"logit_bias": {"9": -100, "2": 0.5}}) == q  # a JSON object
    assert SamplingParams.from_dict(q.to_dict()) == q and hash(q) == hash(
        SamplingParams.from_dict(q.to_dict())
    )
    bad = [
        ({3: 100.5}, r"logit_bias\[3\].*100\.5"),
        ({-1: 1.0}, r"logit_bias token.*-1"),
        ({"x7": 1.0}, r"logit_bias token.*'x7'"),
        ([("7", 1.0)], r"logit_bias token.*'7'"),  # decimal strings only as mapping keys (JSON)
        ([(1, 2.0), (1, 3.0)], "twice"),
        ([(1, 2.0, 3.0)], "pairs"),
        ("x", "pairs"),
    ]
    for value, match in bad:
        with pytest.raises(ValueError, match=match):
            SamplingParams(logit_bias=value)
