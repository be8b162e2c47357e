"""The official `openai` client against a live server: completions and chat, streamed and not,
logprobs (prompt logprobs through echo, as loglikelihood evals use them), n > 1, seeds, stop strings,
usage, and the RL extras (token ids, weight version)."""

from __future__ import annotations

import math

import pytest

openai = pytest.importorskip("openai")


@pytest.fixture
def client(secured):
    with openai.OpenAI(base_url=f"{secured.url}/v1", api_key=secured.api_key, max_retries=0) as c:
        yield c


def extra(obj, name):
    """An extension field of a response object (the client keeps unknown fields as extras)."""
    return (obj.model_extra or {}).get(name)


def test_models(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"]


def test_completion_text_and_ids(client, secured):
    r = client.completions.create(model="tiny", prompt="Hello", max_tokens=6, temperature=0.0)
    (c,) = r.choices
    assert c.finish_reason == "length" and isinstance(c.text, str)
    ids = extra(c, "token_ids")
    assert len(ids) == 6 and extra(c, "prompt_token_ids") == list(b"Hello")
    assert extra(c, "weight_version") == secured.state()["weight_version"]
    assert r.usage.prompt_tokens == 5 and r.usage.completion_tokens == 6 and r.usage.total_tokens == 11
    # token-id prompts, and a batch of prompts of both kinds
    r2 = client.completions.create(model="tiny", prompt=list(b"Hello"), max_tokens=6, temperature=0.0)
    assert extra(r2.choices[0], "token_ids") == ids and r2.choices[0].text == c.text
    r3 = client.completions.create(model="tiny", prompt=["Hello", "Hi"], max_tokens=3, temperature=0.0)
    assert [ch.index for ch in r3.choices] == [0, 1] and extra(r3.choices[0], "token_ids") == ids[:3]
    r4 = client.completions.create(model="tiny", prompt=[[72, 105], [72, 101]], max_tokens=2, temperature=0.0)
    assert len(r4.choices) == 2 and r4.usage.prompt_tokens == 4


def test_n_and_seeds(client):
    kw = dict(model="tiny", prompt="Once upon", max_tokens=8, temperature=1.0, n=3, seed=1234)
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    ids_a = [extra(c, "token_ids") for c in a.choices]
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert ids_a == [extra(c, "token_ids") for c in b.choices]  # same seed: same samples
    assert len({tuple(x) for x in ids_a}) == 3  # the n samples differ from each other
    c = client.completions.create(**{**kw, "seed": 99})
    assert [extra(x, "token_ids") for x in c.choices] != ids_a
    assert a.usage.completion_tokens == 24


def test_stream_equals_whole(client):
    kw = dict(model="tiny", prompt="The sky", max_tokens=12, temperature=0.8, seed=7, n=2)
    whole = client.completions.create(**kw)
    texts, ids, finish = ["", ""], [[], []], [None, None]
    usage = None
    for chunk in client.completions.create(**kw, stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
            assert chunk.choices == []
        for ch in chunk.choices:
            texts[ch.index] += ch.text
            ids[ch.index] += extra(ch, "token_ids")
            if ch.finish_reason:
                finish[ch.index] = ch.finish_reason
    assert texts == [c.text for c in whole.choices]
    assert ids == [extra(c, "token_ids") for c in whole.choices]
    assert finish == ["length", "length"] and usage.completion_tokens == 24 and usage.prompt_tokens == 7
    # logprobs with echo: the streamed pieces add up to the whole one's (text_offset restarted at 0
    # in every chunk)
    kw = {**kw, "logprobs": 1, "echo": True}
    whole = client.completions.create(**kw)
    tokens, offsets = [[], []], [[], []]
    for chunk in client.completions.create(**kw, stream=True):
        for ch in chunk.choices:
            tokens[ch.index] += ch.logprobs.tokens
            offsets[ch.index] += ch.logprobs.text_offset
    assert tokens == [c.logprobs.tokens for c in whole.choices]
    assert offsets == [c.logprobs.text_offset for c in whole.choices]
    assert all(o == sorted(o) and o[-1] > 7 for o in offsets)


def test_logprobs_and_echo_for_loglikelihood(client):
    # lm-eval's loglikelihood request: echo the prompt with logprobs, one token generated.
    prompt = "The cat sat"
    r = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=1, temperature=0.0, logprobs=2, echo=True
    )
    (c,) = r.choices
    lp = c.logprobs
    n_prompt = len(prompt.encode())
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == n_prompt + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x <= 0 for x in lp.token_logprobs[1:])
    assert c.text.startswith(prompt) and "".join(lp.tokens[:n_prompt]) == prompt
    assert lp.text_offset[:3] == [0, 1, 2]
    for tok, top, x in zip(lp.tokens[1:], lp.top_logprobs[1:], lp.token_logprobs[1:], strict=True):
        assert top[tok] == x and 1 <= len(top) <= 3  # top 2 and the token itself
    # the greedy token is the argmax of its own top logprobs
    assert max(lp.top_logprobs[-1].values()) == lp.token_logprobs[-1]
    # max_tokens=0 with echo: scores the prompt only, the same prompt logprobs
    r0 = client.completions.create(model="tiny", prompt=prompt, max_tokens=0, logprobs=1, echo=True)
    lp0 = r0.choices[0].logprobs
    assert r0.choices[0].text == prompt and r0.usage.completion_tokens == 0
    assert len(lp0.tokens) == n_prompt
    assert all(
        math.isclose(a, b, abs_tol=1e-4)
        for a, b in zip(lp0.token_logprobs[1:], lp.token_logprobs[1:n_prompt], strict=True)
    )


def test_stop_strings_streamed_and_whole(client):
    # find a string the greedy output contains, then stop on it
    base = client.completions.create(model="tiny", prompt="abc", max_tokens=16, temperature=0.0)
    text = base.choices[0].text
    stop = text[5:7] if len(text) >= 7 and "\ufffd" not in text[:7] else None
    if stop is None:
        pytest.skip("the random model's greedy text has no clean stop string")
    r = client.completions.create(model="tiny", prompt="abc", max_tokens=16, temperature=0.0, stop=[stop])
    c = r.choices[0]
    assert (
        c.finish_reason == "stop" and c.text == text[: text.index(stop)] and extra(c, "stop_reason") == stop
    )
    streamed = "".join(
        ch.text
        for chunk in client.completions.create(
            model="tiny", prompt="abc", max_tokens=16, temperature=0.0, stop=[stop], stream=True
        )
        for ch in chunk.choices
    )
    assert streamed == c.text


def test_chat(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    r = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=6, temperature=0.0, logprobs=True, top_logprobs=3
    )
    (c,) = r.choices
    assert c.message.role == "assistant" and c.finish_reason == "length"
    content = c.logprobs.content
    assert len(content) == 6 and all(len(t.top_logprobs) == 3 for t in content)
    assert all(t.top_logprobs[0].logprob >= t.logprob for t in content)  # greedy: the top one
    prompt_ids = extra(c, "prompt_token_ids")
    assert prompt_ids[0] == 257 and r.usage.prompt_tokens == len(prompt_ids)  # <|im_start|>
    # streamed: role first, then content that adds up to the whole answer
    parts, roles, finish = [], [], None
    for chunk in client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=6, temperature=0.0, stream=True
    ):
        for ch in chunk.choices:
            roles += [ch.delta.role] if ch.delta.role else []
            parts.append(ch.delta.content or "")
            finish = ch.finish_reason or finish
    assert roles == ["assistant"] and "".join(parts) == c.message.content and finish == "length"


def test_chat_n_seed(client):
    kw = dict(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=5, n=2, seed=3)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert len(a.choices) == 2 and a.usage.completion_tokens == 10


def test_client_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x", max_tokens=1, temperature=-1.0)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "x"}],
            max_tokens=1,
            top_logprobs=50,
            logprobs=True,
        )
    assert e.value.body["param"] == "top_logprobs"
    bad = openai.OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_penalties(client, secured):
    """presence/frequency penalties (OpenAI's fields) and repetition_penalty (vLLM's extension) reach
    the sampler: the same tokens as the native route given the same sampling params, and a greedy
    run that repeats itself does so less under a frequency penalty."""
    import httpx

    kw = dict(model="tiny", prompt=[5, 6, 7], max_tokens=12, temperature=0.0)
    plain = extra(client.completions.create(**kw).choices[0], "token_ids")
    penalties = dict(presence_penalty=0.5, frequency_penalty=2.0)
    r = client.completions.create(**kw, **penalties, extra_body={"repetition_penalty": 1.3})
    ids = extra(r.choices[0], "token_ids")
    params = dict(max_tokens=12, temperature=0.0, repetition_penalty=1.3, **penalties)
    body = {"prompt_token_ids": [5, 6, 7], "sampling_params": params}
    native = httpx.post(secured.url + "/generate", json=body, headers=secured.headers(), timeout=30).json()
    assert native["outputs"][0]["token_ids"] == ids
    assert max(ids.count(t) for t in ids) < max(plain.count(t) for t in plain)


def test_logit_bias(client, secured):
    """OpenAI's logit_bias ({"token id": bias}): +100 makes the token the only choice; the native
    route takes the same JSON object."""
    import httpx

    r = client.completions.create(
        model="tiny", prompt=[5, 6, 7], max_tokens=5, temperature=1.0, seed=1, logit_bias={"42": 100}
    )
    assert extra(r.choices[0], "token_ids") == [42] * 5
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3, logit_bias={"43": 100}
    )
    assert extra(chat.choices[0], "token_ids") == [43] * 3
    body = {"prompt_token_ids": [5, 6], "sampling_params": {"max_tokens": 4, "logit_bias": {"44": 100}}}
    native = httpx.post(secured.url + "/generate", json=body, headers=secured.headers(), timeout=30).json()
    assert native["outputs"][0]["token_ids"] == [44] * 4
