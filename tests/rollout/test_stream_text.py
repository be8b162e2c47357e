"""Streamed text: ``IncrementalDetokenizer`` on the tiny preset's byte-level tokenizer (random bytes
often form partial UTF-8 sequences), and ``AsyncLLM`` text deltas / cumulative text against the final
text ``LLM.generate`` gives for the same requests, with and without stop strings."""

from __future__ import annotations

import asyncio
import random
from types import SimpleNamespace

import pytest

from rollout import LLM, AsyncLLM, CacheConfig, SamplingParams
from rollout.detokenizer import Detokenizer, IncrementalDetokenizer
from rollout.presets import build_byte_tokenizer

BLOCKS = 512
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
SPECIAL = (256, 257, 258, 259)  # the tiny tokenizer's special tokens: ids after the 256 bytes
WORDS = ("a", " ", "é", "ß", "€", "日本", "𝄞", "🙂", "\n", "xyz")  # 1- to 4-byte UTF-8 characters


@pytest.fixture(scope="module")
def detok() -> Detokenizer:
    return Detokenizer(build_byte_tokenizer())


def random_ids(rng: random.Random) -> list[int]:
    """Token ids mixing valid multi-byte characters, random bytes and special tokens."""
    ids: list[int] = []
    for _ in range(rng.randint(0, 40)):
        r = rng.random()
        if r < 0.5:
            ids += rng.choice(WORDS).encode()
        elif r < 0.9:
            ids.append(rng.randrange(256))
        else:
            ids.append(rng.choice(SPECIAL))
    return ids


def stream(d: IncrementalDetokenizer, ids: list[int], rng: random.Random, final: str | None) -> list[str]:
    """Feed ``ids`` in random chunks (the last chunk with the finish); the pieces handed out."""
    pieces, i = [], 0
    while True:
        j = i + rng.randint(0, 4)
        if j >= len(ids):
            return [*pieces, d.finish(ids[i:], final)]
        pieces.append(d.step(ids[i:j]))
        i = j


@pytest.mark.parametrize("skip", [True, False])
def test_pieces_add_up_to_the_full_decode(detok, skip):
    rng = random.Random(skip)
    partial = specials = 0
    for _ in range(300):
        ids = random_ids(rng)
        full = detok.decode(ids, skip)
        for final in (None, full):
            d = IncrementalDetokenizer(detok, skip)
            pieces = stream(d, ids, rng, final)
            assert "".join(pieces) == full == d.text
            shown = ""
            for p in pieces[:-1]:
                shown += p
                # nothing handed out changes later: an incomplete character waits for its bytes,
                # and a U+FFFD handed out (of bytes invalid for good) stays one
                assert full.startswith(shown)
        partial += "\ufffd" in full
        specials += "<|" in full
    assert partial > 50 and (specials > 50) == (not skip)


def test_valid_text_never_shows_a_replacement_character(detok):
    rng = random.Random(0)
    for _ in range(200):
        text = "".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30)))
        d = IncrementalDetokenizer(detok)
        pieces = stream(d, list(text.encode()), rng, None)
        assert "".join(pieces) == text and "\ufffd" not in "".join(pieces)


def test_a_step_decodes_only_a_window(detok):
    """O(new tokens): the tokens decoded over a long stream grow linearly, not quadratically."""
    decoded = []

    class Counting(Detokenizer):
        def decode(self, token_ids, skip_special_tokens=True):
            decoded.append(len(token_ids))
            return super().decode(token_ids, skip_special_tokens)

    ids = list(("日本語のテキスト🙂 and text " * 100).encode())
    d = IncrementalDetokenizer(Counting(detok.tokenizer))
    assert "".join(d.step([t]) for t in ids) + d.finish([], None) == detok.decode(ids)
    assert sum(decoded) < 10 * len(ids)


def first_stop(detok: Detokenizer, ids: list[int], stop: str) -> tuple[int, str] | None:
    """Feed ``ids`` one at a time to ``check_stop``: (tokens fed, text) when it stops."""
    req = SimpleNamespace(params=SamplingParams(stop=[stop]), output_token_ids=[], text="", stop_scan=None)
    for i, t in enumerate(ids):
        req.output_token_ids.append(t)
        if detok.check_stop(req) is not None:  # type: ignore[arg-type]
            return i + 1, req.text
    return None


def test_stop_strings_ending_in_multibyte_characters(detok):
    """A stop string whose last character's bytes come in several tokens: the text before held
    U+FFFD there, which the last byte replaces in place; the search must look at it again (such
    stops were missed)."""
    for before, stop in (("a", "ʐ"), ("x", "aʐ"), ("é", "€"), ("ok ", "𝄞"), ("日", "本")):
        ids = list((before + stop + "tail").encode())
        assert first_stop(detok, ids, stop) == (len((before + stop).encode()), before), (before, stop)
    rng = random.Random(7)
    for _ in range(200):  # the stop is found at the first token whose text holds it, cut there
        ids = random_ids(rng)
        text = detok.decode(ids)
        if len(text) < 2:
            continue
        i = rng.randrange(len(text) - 1)
        stop = text[i : i + rng.randint(1, 3)]
        if "\ufffd" in stop:
            continue
        k = next(k for k in range(1, len(ids) + 1) if stop in detok.decode(ids[:k]))
        prefix = detok.decode(ids[:k])
        assert first_stop(detok, ids, stop) == (k, prefix[: prefix.index(stop)]), (ids, stop)


def test_stop_checks_decode_a_window_not_the_whole_output(detok):
    """Checking stop strings after every token decodes a short window each time (the whole output
    each time made a 2,000-token output cost 27x more on the CPU), and the text is the full decode."""
    decoded: list[int] = []

    class Counting(Detokenizer):
        def decode(self, token_ids, skip_special_tokens=True):
            decoded.append(len(token_ids))
            return super().decode(token_ids, skip_special_tokens)

    ids = list(("日本語のテキスト🙂 and text " * 60).encode())
    counting = Counting(detok.tokenizer)
    req = SimpleNamespace(
        params=SamplingParams(stop=["</answer>"]), output_token_ids=[], text="", stop_scan=None
    )
    for t in ids:
        req.output_token_ids.append(t)
        assert counting.check_stop(req) is None  # type: ignore[arg-type]
    assert req.text == detok.decode(ids) and sum(decoded) < 10 * len(ids)


def test_invalid_bytes_do_not_grow_the_window(detok):
    """An output of bytes that never form UTF-8 (an untrained model's) is sent as U+FFFD after a
    few tokens instead of held back (and decoded again, longer) at every step; the text is still the
    full decode, and a character split over tokens still waits for its bytes."""
    decoded: list[int] = []

    class Counting(Detokenizer):
        def decode(self, token_ids, skip_special_tokens=True):
            decoded.append(len(token_ids))
            return super().decode(token_ids, skip_special_tokens)

    ids = [0xE4, 0xFF, 0xBD] * 300  # a lead byte, then invalid ones: every step ends incomplete
    d = IncrementalDetokenizer(Counting(detok.tokenizer))
    pieces = [d.step([t]) for t in ids]
    assert "".join(pieces) + d.finish([], None) == detok.decode(ids)
    assert max(decoded) <= 16 and sum(map(len, pieces)) > 850  # was 900 tokens, all at the finish
    d = IncrementalDetokenizer(detok)
    assert [d.step([t]) for t in "a日".encode()] == ["a", "", "", "日"]


def test_holdback_waits_for_the_end(detok):
    params = SamplingParams(stop=["ab", "wxyz"])
    assert IncrementalDetokenizer.for_params(detok, params).holdback == 3
    assert IncrementalDetokenizer.for_params(detok, SamplingParams()).holdback == 0
    include = SamplingParams(stop=["wxyz"], include_stop_str_in_output=True)
    assert IncrementalDetokenizer.for_params(detok, include).holdback == 0
    d = IncrementalDetokenizer.for_params(detok, params)
    assert [d.step(list(c.encode())) for c in "hello"] == ["", "", "", "h", "e"]
    assert d.text == "he" and d.finish([], "hel") == "l" and d.text == "hel"  # the core cut "lo"


def test_final_text_wins(detok):
    d = IncrementalDetokenizer(detok)
    assert d.step(list(b"abc")) == "abc"
    # a final text the stream disagrees with (should not happen): the rest past what was sent
    assert d.finish(list(b"d"), "xbcdef") == "def" and d.finish([], "other") == ""
    with pytest.raises(RuntimeError, match="finished"):
        d.step([1])


# ---- AsyncLLM against LLM.generate on the tiny model -------------------------------------------
@pytest.fixture(scope="module")
def llm():
    with AsyncLLM("tiny", device="cpu", cache_config=CacheConfig(num_blocks=BLOCKS), env=ONE_THREAD) as llm:
        yield llm


@pytest.fixture(scope="module")
def reference():
    return LLM("tiny", device="cpu", cache_config=CacheConfig(num_blocks=BLOCKS))


def run(coro, timeout: float = 120.0):
    async def bounded():
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


async def collect(llm, prompt, params, kind):
    return [out async for out in llm.generate(prompt, params, output_kind=kind)]


def generate(reference: LLM, requests):
    return reference.generate([p for p, _ in requests], [params for _, params in requests], use_tqdm=False)


def stream_all(llm, requests):
    """Every request streamed twice at once: in delta and in cumulative outputs."""

    async def main():
        tasks = [collect(llm, p, params, kind) for p, params in requests for kind in ("delta", "cumulative")]
        return await asyncio.gather(*tasks)

    outs = run(main())
    return list(zip(outs[::2], outs[1::2], strict=True))


def check_text(delta_outs, cumulative_outs, ref) -> int:
    """Delta texts add up to ``ref``'s final text, never showing a character that is not in it; the
    cumulative texts grow to it. Returns how many delta outputs held all their tokens' text back."""
    held = 0
    for c in ref.outputs:
        final, shown, ids = c.text, "", []
        assert final is not None
        for out in delta_outs:
            for o in out.outputs:
                if o.index == c.index:
                    shown += o.text
                    ids += o.token_ids
                    assert final.startswith(shown), (shown, final)
                    held += bool(o.token_ids) and not o.text and o.finish_reason is None
        assert ids == c.token_ids and shown == final
        texts = [out.outputs[c.index].text for out in cumulative_outs]
        assert all(final.startswith(t) for t in texts) and texts[-1] == final
        assert all(b.startswith(a) for a, b in zip(texts, texts[1:], strict=False))
    return held


def requests_for(seed: int, count: int, **overrides):
    rng = random.Random(seed)
    reqs = []
    for _ in range(count):
        greedy = rng.random() < 0.5
        params = dict(
            temperature=0.0 if greedy else 1.0,
            seed=None if greedy else rng.randrange(10**6),
            max_tokens=rng.randint(8, 40),
            n=rng.choice([1, 1, 2]),
            ignore_eos=True,
            skip_special_tokens=rng.random() < 0.5,
        )
        reqs.append(([rng.randrange(1, 256) for _ in range(rng.randint(1, 8))], params | overrides))
    return reqs


def test_streamed_text_adds_up_to_the_final_text(llm, reference):
    reqs = [(p, SamplingParams(**kw)) for p, kw in requests_for(0, 24)]
    refs = generate(reference, reqs)
    held = sum(check_text(d, c, ref) for (d, c), ref in zip(stream_all(llm, reqs), refs, strict=True))
    texts = [c.text for r in refs for c in r.outputs]
    assert held > 0 and any("\ufffd" in t for t in texts)  # partial characters were held back
    assert any(ch > "\x7f" and ch != "\ufffd" for t in texts for ch in t)  # and completed
    assert any("<|" in t for t in texts)  # special tokens shown (skip_special_tokens=False)


@pytest.mark.parametrize("include", [False, True])
def test_stop_strings_never_stream_past_the_cut(llm, reference, include):
    rng = random.Random(include)
    plain = [(p, SamplingParams(**kw)) for p, kw in requests_for(1, 24, n=1, skip_special_tokens=True)]
    reqs = []
    for (prompt, params), out in zip(plain, generate(reference, plain), strict=True):
        text = out.outputs[0].text  # stop on a piece of it, and on a string it lacks
        start = rng.randrange(max(1, len(text) - 4))
        stops = [text[start : start + rng.randint(1, 4)] or "x", "never" * rng.randint(0, 1) + "#~"]
        reqs.append((prompt, params.replace(stop=stops, include_stop_str_in_output=include)))
    refs = generate(reference, reqs)
    for (d, c), ref, (_, params) in zip(stream_all(llm, reqs), refs, reqs, strict=True):
        check_text(d, c, ref)
        (o,) = ref.outputs
        if o.finish_reason == "stop" and not include:
            assert o.stop_reason in params.stop and o.stop_reason not in o.text
    assert sum(r.outputs[0].finish_reason == "stop" for r in refs) > 12


def test_token_id_requests_load_no_tokenizer_and_get_no_text(llm, monkeypatch):
    loads = []
    real = Detokenizer.from_pretrained
    monkeypatch.setattr(Detokenizer, "from_pretrained", lambda path: loads.append(path) or real(path))
    monkeypatch.setattr(llm, "_tokenizer_loaded", False)
    monkeypatch.setattr(llm, "_detokenizer", None)
    params = SamplingParams(max_tokens=6, ignore_eos=True, detokenize=False)
    for kind in ("delta", "cumulative"):
        outs = run(collect(llm, [1, 2, 3], params, kind))
        assert all(o.text is None for out in outs for o in out.outputs) and not loads
    outs = run(collect(llm, [1, 2, 3], params.replace(detokenize=True), "delta"))
    assert all(o.text is not None for out in outs for o in out.outputs) and len(loads) == 1
    run(collect(llm, [1, 2, 3], params.replace(detokenize=True), "delta"))
    assert len(loads) == 1 and llm.get_tokenizer() is not None
