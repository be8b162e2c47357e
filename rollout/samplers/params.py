"""Per-request sampling parameters: the user-facing contract, validated once at construction."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

MAX_LOGPROBS = 20
"""Most top logprobs a request may ask for, per output token and per prompt token."""

GREEDY_TEMPERATURE = 1e-5
"""Temperatures below this count as 0 (greedy): dividing logits by them would overflow float32."""

LogprobsMode = Literal["raw", "processed"]
_LOGPROBS_MODES = ("raw", "processed")
_SEED_MIN, _SEED_MAX = -(2**63), 2**64 - 1  # what torch.manual_seed accepts: int64 or uint64
_INT_MAX = 2**63 - 1  # every other int field: int64, as the engine's messages (msgpack) carry them


@dataclass(frozen=True, init=False)
class SamplingParams:
    """How to sample the completions of one prompt. Immutable; every field is checked on construction.

    Construct with keywords (``SamplingParams(temperature=0.7, max_tokens=256)``), from a mapping
    (``SamplingParams.from_dict(body)``), or from another instance (``params.replace(n=4)``). A bad
    value or an unknown field raises ``ValueError`` naming the field and the value.

    Sampling order: logits -> logit bias -> penalties -> temperature -> top-k -> top-p -> min-p ->
    draw. ``top_p``
    applies to the top-k-renormalized distribution. Penalties follow vLLM (and HF for repetition):
    ``repetition_penalty`` divides the positive logits and multiplies the negative ones of every token
    in the prompt or the output so far; ``frequency_penalty`` subtracts itself times the token's count
    in the output so far, ``presence_penalty`` subtracts itself once for any token in the output. A
    request is greedy when ``temperature`` is 0 (below ``GREEDY_TEMPERATURE``) or ``top_k`` is 1;
    greedy rows take the argmax of the penalized logits and ignore the seed.

    Logprobs: the sampled token's logprob is always returned. ``logprobs_mode`` picks its distribution:
    ``"raw"`` is ``log_softmax`` of the model's logits, untouched (what a trainer recomputes);
    ``"processed"`` is ``log_softmax`` of the distribution actually sampled from (after penalties,
    temperature, top-k, top-p, min-p and min_tokens bans; greedy rows use temperature 1). See
    ``rollout.samplers.sampler``.
    """

    max_logprobs: ClassVar[int] = MAX_LOGPROBS

    n: int  # completions to generate for the prompt (each one its own sequence and seed)
    temperature: float  # logits are divided by it; 0 = greedy
    top_k: int  # keep the k most likely tokens; -1 or 0 = off
    top_p: float  # keep the smallest set of most likely tokens with mass >= top_p; 1 = off
    min_p: float  # drop tokens with probability < min_p * max probability; 0 = off
    presence_penalty: float  # in [-2, 2]: subtracted from the logit of every token already output
    frequency_penalty: float  # in [-2, 2]: times a token's count in the output, subtracted from its logit
    # in [1e-6, 1e6]: logits of prompt and output tokens are divided by it (x it if < 0); the bounds
    # keep the penalized, temperature-scaled float32 logits finite (1e-40 gave NaN logprobs)
    repetition_penalty: float
    logit_bias: tuple[tuple[int, float], ...]  # (token, bias in [-100, 100]) added to that token's logit
    seed: int | None  # None: the engine picks a random seed; else draws are reproducible
    max_tokens: int  # most output tokens to generate
    min_tokens: int  # EOS and stop_token_ids are banned, stop strings ignored, until this many are out
    stop: tuple[str, ...]  # stop strings (a bare str is wrapped); the match ends the output
    stop_token_ids: tuple[int, ...]  # tokens that end the output, besides EOS
    ignore_eos: bool  # keep generating past EOS (benchmarks)
    logprobs: int | None  # top logprobs to return per output token; None or 0 = only the sampled one
    prompt_logprobs: int | None  # None = off; k >= 0: every prompt token's logprob plus its top k
    logprobs_mode: LogprobsMode  # "raw" or "processed", see the class docstring
    include_stop_str_in_output: bool  # keep the matched stop string in the text
    skip_special_tokens: bool  # drop special tokens when detokenizing
    detokenize: bool  # produce text at all (RL loops usually want token ids only)

    def __init__(
        self,
        *,
        n: int = 1,
        temperature: float = 1.0,
        top_k: int = -1,
        top_p: float = 1.0,
        min_p: float = 0.0,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        repetition_penalty: float = 1.0,
        logit_bias: Mapping[int, float] | Sequence[tuple[int, float]] | None = None,
        seed: int | None = None,
        max_tokens: int = 16,
        min_tokens: int = 0,
        stop: str | list[str] | tuple[str, ...] = (),
        stop_token_ids: list[int] | tuple[int, ...] = (),
        ignore_eos: bool = False,
        logprobs: int | None = None,
        prompt_logprobs: int | None = None,
        logprobs_mode: LogprobsMode = "raw",
        include_stop_str_in_output: bool = False,
        skip_special_tokens: bool = True,
        detokenize: bool = True,
        **unknown: Any,
    ) -> None:
        if unknown:
            raise ValueError(f"unknown SamplingParams field(s): {', '.join(sorted(unknown))}")
        max_tokens = _int("max_tokens", max_tokens, lo=1)
        values: dict[str, Any] = {
            "n": _int("n", n, lo=1),
            "temperature": _float("temperature", temperature, lo=0.0),
            "top_k": _int("top_k", top_k, lo=-1),
            "top_p": _float("top_p", top_p, lo=0.0, hi=1.0, lo_open=True),
            "min_p": _float("min_p", min_p, lo=0.0, hi=1.0),
            "presence_penalty": _float("presence_penalty", presence_penalty, lo=-2.0, hi=2.0),
            "frequency_penalty": _float("frequency_penalty", frequency_penalty, lo=-2.0, hi=2.0),
            "repetition_penalty": _float("repetition_penalty", repetition_penalty, lo=1e-6, hi=1e6),
            "logit_bias": _logit_bias(logit_bias),
            "seed": None if seed is None else _int("seed", seed, lo=_SEED_MIN, hi=_SEED_MAX),
            "max_tokens": max_tokens,
            "min_tokens": _int("min_tokens", min_tokens, lo=0),
            "stop": _stop_strings(stop),
            "stop_token_ids": _token_ids("stop_token_ids", stop_token_ids),
            "ignore_eos": _bool("ignore_eos", ignore_eos),
            "logprobs": _optional_count("logprobs", logprobs),
            "prompt_logprobs": _optional_count("prompt_logprobs", prompt_logprobs),
            "logprobs_mode": logprobs_mode,
            "include_stop_str_in_output": _bool("include_stop_str_in_output", include_stop_str_in_output),
            "skip_special_tokens": _bool("skip_special_tokens", skip_special_tokens),
            "detokenize": _bool("detokenize", detokenize),
        }
        if values["min_tokens"] > max_tokens:
            raise ValueError(f"min_tokens must be <= max_tokens ({max_tokens}), got {values['min_tokens']!r}")
        if not isinstance(logprobs_mode, str) or logprobs_mode not in _LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode must be one of {_LOGPROBS_MODES}, got {logprobs_mode!r}")
        for name, value in values.items():
            object.__setattr__(self, name, value)  # frozen: __setattr__ is blocked after this

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SamplingParams:
        """Build from a mapping of field names (e.g. a decoded HTTP/msgpack body); same checks."""
        if not isinstance(data, Mapping):
            raise ValueError(f"SamplingParams.from_dict needs a mapping, got {type(data).__name__}")
        bad_keys = [k for k in data if not isinstance(k, str)]
        if bad_keys:
            raise ValueError(f"SamplingParams field names must be strings, got {bad_keys!r}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (lists, not tuples) that ``from_dict`` accepts back."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["stop"] = list(self.stop)
        out["stop_token_ids"] = list(self.stop_token_ids)
        out["logit_bias"] = [list(pair) for pair in self.logit_bias]  # pairs: msgpack keys stay strings
        return out

    def replace(self, **changes: Any) -> SamplingParams:
        """A validated copy with ``changes`` applied (unknown names raise ``ValueError``)."""
        return SamplingParams(**{**self.to_dict(), **changes})

    @property
    def has_penalties(self) -> bool:
        """Whether any penalty is on (the sampler then needs the row's token history)."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @property
    def is_greedy(self) -> bool:
        """Whether every token is the argmax (temperature ~0 or top_k == 1)."""
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1


def _int(name: str, value: Any, *, lo: int | None = None, hi: int | None = None) -> int:
    # bool is an int subclass; True as a count is always a caller bug.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    value = int(value)
    hi = _INT_MAX if hi is None else hi
    if (lo is not None and value < lo) or value > hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value!r}")
    return value


def _float(name: str, value: Any, *, lo: float, hi: float | None = None, lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    too_low = value <= lo if lo_open else value < lo
    # not finite catches nan (every comparison with nan is False) and inf.
    if not math.isfinite(value) or too_low or (hi is not None and value > hi):
        interval = f"{'(' if lo_open else '['}{lo}, {'inf)' if hi is None else f'{hi}]'}"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return value


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r} ({type(value).__name__})")
    return value


def _optional_count(name: str, value: Any) -> int | None:
    return None if value is None else _int(name, value, lo=0, hi=MAX_LOGPROBS)


def _stop_strings(value: Any) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(s, str) and s for s in items):
        raise ValueError(f"stop must be a non-empty str or a list of non-empty str, got {value!r}")
    return tuple(items)


def _logit_bias(value: Any) -> tuple[tuple[int, float], ...]:
    """{token: bias} or [(token, bias), ...] -> pairs sorted by token (one bias per token). A mapping
    may key tokens by their decimal string, as JSON objects do."""
    if value is None:
        return ()
    pairs_given = isinstance(value, (list, tuple)) and all(
        isinstance(p, (list, tuple)) and len(p) == 2 for p in value
    )
    if not (isinstance(value, Mapping) or pairs_given):
        raise ValueError(f"logit_bias must be a {{token: bias}} mapping or (token, bias) pairs: {value!r}")
    items = list(value.items()) if isinstance(value, Mapping) else [tuple(p) for p in value]
    pairs = {}
    for token, bias in items:
        if isinstance(value, Mapping) and isinstance(token, str) and token.isdecimal() and token.isascii():
            token = int(token)
        token = _int("logit_bias token", token, lo=0)
        if token in pairs:
            raise ValueError(f"logit_bias has token {token} twice")
        pairs[token] = _float(f"logit_bias[{token}]", bias, lo=-100.0, hi=100.0)
    return tuple(sorted(pairs.items()))


def _token_ids(name: str, value: Any) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{name} must be a list of int, got {value!r} ({type(value).__name__})")
    return tuple(_int(f"{name}[{i}]", v, lo=0) for i, v in enumerate(value))
