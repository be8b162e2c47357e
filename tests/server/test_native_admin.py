"""The native routes (/generate streamed and not, /tokenize, /detokenize, /health, /version), raw SSE
framing, /metrics through prometheus_client's parser, and the admin routes: refused when not enabled
or without the admin key; pause/resume/abort/reset through them."""

from __future__ import annotations

import asyncio
import json
import time

import httpx

from rollout.messages import CONTROL_METHODS
from rollout.server.admin_routes import CALLS
from tests.server.conftest import assert_clean


def parse_sse(raw: str) -> list:
    """Events of a raw SSE body; every event must be one `data: ` line followed by a blank line."""
    assert raw.endswith("\n\n"), raw[-100:]
    events = []
    for block in raw[:-2].split("\n\n"):
        lines = block.split("\n")
        assert len(lines) == 1 and lines[0].startswith("data: "), block
        payload = lines[0][len("data: ") :]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    return events[:-1]


def test_generate(secured):
    params = {"max_tokens": 7, "temperature": 1.0, "seed": 5, "n": 2, "logprobs": 2, "prompt_logprobs": 1}
    with secured.client() as c:
        r = c.post("/generate", json={"prompt_token_ids": [3, 1, 4, 1, 5], "sampling_params": params})
        assert r.status_code == 200, r.text
        body = r.json()
        version = secured.state()["weight_version"]
        assert body["prompt_token_ids"] == [3, 1, 4, 1, 5] and body["weight_version"] == version
        assert len(body["prompt_logprobs"]) == 5 and body["prompt_logprobs"][0] is None
        assert [o["index"] for o in body["outputs"]] == [0, 1]
        for o in body["outputs"]:
            assert len(o["token_ids"]) == len(o["logprobs"]) == len(o["weight_versions"]) == 7
            assert o["weight_versions"] == [version] * 7 and o["finish_reason"] == "length"
            assert all(len(t) <= 2 and all(isinstance(p[0], int) for p in t) for t in o["top_logprobs"])
        # streamed: the same tokens (same seed), delivered as SSE deltas
        r = c.post(
            "/generate", json={"prompt_token_ids": [3, 1, 4, 1, 5], "sampling_params": params, "stream": True}
        )
        assert r.headers["content-type"].startswith("text/event-stream")
        events = parse_sse(r.text)
        assert events[0]["prompt_token_ids"] == [3, 1, 4, 1, 5] and events[-1]["finished"]
        assert sum("prompt_logprobs" in e for e in events) == 1
        ids = [[], []]
        for e in events:
            for o in e["outputs"]:
                ids[o["index"]] += o["token_ids"]
        assert ids == [o["token_ids"] for o in body["outputs"]]
        # a text prompt works too (the model has a tokenizer)
        r = c.post(
            "/generate", json={"prompt": "Hi", "sampling_params": {"max_tokens": 2, "detokenize": False}}
        )
        assert r.json()["prompt_token_ids"] == [72, 105] and r.json()["outputs"][0]["text"] is None


def test_raw_openai_streams(secured):
    with secured.client() as c:
        body = {"model": "tiny", "prompt": [1, 2], "max_tokens": 5, "stream": True, "n": 2, "logprobs": 1}
        events = parse_sse(c.post("/v1/completions", json=body).text)
        assert all(e["object"] == "text_completion" and len(e["choices"]) == 1 for e in events)
        assert sum(len(e["choices"][0]["token_ids"]) for e in events) == 10
        assert sorted(
            e["choices"][0]["finish_reason"] for e in events if e["choices"][0]["finish_reason"]
        ) == [
            "length",
            "length",
        ]
        chat = {
            "model": "tiny",
            "messages": [{"role": "user", "content": "x"}],
            "max_tokens": 3,
            "stream": True,
        }
        events = parse_sse(c.post("/v1/chat/completions", json=chat).text)
        assert events[0]["choices"][0]["delta"]["role"] == "assistant"
        assert all(e["object"] == "chat.completion.chunk" for e in events)


def test_tokenize_detokenize_health_version(secured):
    with secured.client() as c:
        r = c.post("/tokenize", json={"prompt": "Héllo"}).json()
        assert r["tokens"] == list("Héllo".encode()) and r["count"] == 6 and r["max_model_len"] == 4096
        assert c.post("/detokenize", json={"tokens": r["tokens"]}).json()["prompt"] == "Héllo"
        chat = c.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
        text = c.post("/detokenize", json={"tokens": chat["tokens"]}).json()["prompt"]
        assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        assert c.get("/health").json() == {"status": "ok"}
        assert c.get("/version").json()["version"]


def test_metrics_parse(secured):
    from prometheus_client.parser import text_string_to_metric_families

    with secured.client() as c:
        c.post("/v1/completions", json={"model": "tiny", "prompt": "abc", "max_tokens": 4})
        text = c.get("/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in (
        "rollout_time_to_first_token_seconds",
        "rollout_inter_token_latency_seconds",
        "rollout_num_requests_running",
        "rollout_num_requests_waiting",
        "rollout_kv_cache_usage_ratio",
        "rollout_prefix_cache_hit_ratio",
        "rollout_generation_tokens",
        "rollout_num_preemptions",
        "rollout_weight_version",
    ):
        assert name in families, sorted(families)

    def value(name, suffix=""):
        return next(s.value for s in families[name].samples if s.name == name + suffix)

    assert value("rollout_time_to_first_token_seconds", "_count") >= 1
    assert value("rollout_generation_tokens", "_total") >= 4
    assert 0.0 <= value("rollout_kv_cache_usage_ratio") <= 1.0
    assert value("rollout_weight_version") == secured.state()["weight_version"]

    # samples of a stream the client left count as finished with "abort" (they were not counted)
    def aborted() -> float:
        with secured.client() as c:
            text = c.get("/metrics").text
        fams = {f.name: f for f in text_string_to_metric_families(text)}
        fam = fams.get("rollout_request_finished")
        samples = fam.samples if fam else []
        return sum(s.value for s in samples if s.labels.get("finish_reason") == "abort")

    before = aborted()
    body = {"model": "tiny", "prompt": "abc", "max_tokens": 2000, "n": 2, "stream": True, "ignore_eos": True}
    with secured.client() as c, c.stream("POST", "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        for _ in range(4):
            next(lines)
    deadline = time.monotonic() + 30
    while aborted() < before + 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert aborted() == before + 2


def test_admin_refused(secured, open_server):
    # not enabled: the routes do not exist
    for path in ("/admin/pause", "/admin/resume", "/admin/abort_all", "/admin/update_weights_from_disk"):
        assert httpx.post(open_server.url + path, json={}).status_code == 404
    assert httpx.get(open_server.url + "/admin/state").status_code == 404
    # enabled: only with the admin key
    for headers in ({}, secured.headers("api"), {"Authorization": "Bearer nope"}):
        for path in ("/admin/pause", "/admin/abort_all", "/admin/reset_prefix_cache", "/admin/sleep"):
            assert httpx.post(secured.url + path, json={}, headers=headers).status_code == 401
        assert httpx.get(secured.url + "/admin/state", headers=headers).status_code == 401
    assert secured.state()["state"] == "running"
    r = httpx.post(secured.url + "/admin/pause", json={"mode": "later"}, headers=secured.headers("admin"))
    assert r.status_code == 400 and r.json()["error"]["param"] == "mode"


async def _stream_generate(url, headers, body, out: list):
    async with (
        httpx.AsyncClient(timeout=60.0) as c,
        c.stream("POST", url + "/generate", json={**body, "stream": True}, headers=headers) as r,
    ):
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                out.append(json.loads(line[6:]))


def test_admin_pause_resume_abort_reset(secured):
    admin = secured.headers("admin")

    def call(method, **body):
        r = httpx.post(f"{secured.url}/admin/{method}", json=body, headers=admin, timeout=30.0)
        assert r.status_code == 200, r.text
        return r.json()["result"]

    async def scenario():
        events: list = []
        # 400 tokens: still streaming when the pause lands, however fast the machine
        body = {"prompt_token_ids": [7, 8, 9], "sampling_params": {"max_tokens": 400, "ignore_eos": True}}
        task = asyncio.ensure_future(_stream_generate(secured.url, secured.headers(), body, events))
        while not events:
            await asyncio.sleep(0.01)
        assert await asyncio.to_thread(call, "pause", mode="keep") == "paused"
        await asyncio.sleep(0.3)  # in flight when paused: nothing arrives while paused
        count = len(events)
        await asyncio.sleep(0.5)
        assert len(events) == count and not task.done()
        assert await asyncio.to_thread(call, "resume") == "running"
        await asyncio.wait_for(task, 60)
        assert sum(len(e["outputs"][0]["token_ids"]) for e in events if e["outputs"]) == 400
        # abort by request id
        events.clear()
        body2 = {
            **body,
            "request_id": "abort-me",
            "sampling_params": {"max_tokens": 3000, "ignore_eos": True},
        }
        task = asyncio.ensure_future(_stream_generate(secured.url, secured.headers(), body2, events))
        while not events:
            await asyncio.sleep(0.01)
        assert await asyncio.to_thread(call, "abort", request_ids=["abort-me"]) == 1
        await asyncio.wait_for(task, 30)
        assert events[-1]["finished"] and events[-1]["outputs"][0]["finish_reason"] == "abort"
        # abort_all
        events.clear()
        task = asyncio.ensure_future(_stream_generate(secured.url, secured.headers(), body2, events))
        while not events:
            await asyncio.sleep(0.01)
        assert await asyncio.to_thread(call, "abort_all") >= 1
        await asyncio.wait_for(task, 30)
        assert events[-1]["outputs"][0]["finish_reason"] == "abort"

    asyncio.run(asyncio.wait_for(scenario(), 90))
    assert call("reset_prefix_cache") in (True, False)
    assert secured.state()["state"] == "running"


def test_admin_sleep_and_wake(secured):
    """sleep frees the engine's memory and holds it in "sleeping"; wake_up brings it back running."""
    admin = secured.headers("admin")
    r = httpx.post(secured.url + "/admin/sleep", json={"level": 1}, headers=admin, timeout=60.0)
    assert r.status_code == 200, r.text
    assert secured.state()["state"] == "sleeping"
    r = httpx.post(secured.url + "/admin/wake_up", json={}, headers=admin, timeout=60.0)
    assert r.status_code == 200, r.text
    assert secured.state()["state"] == "running"


def test_admin_routes_only_for_calls_the_core_serves(secured):
    """Every admin control route reaches a call the engine core answers; a name the core lacks has no
    route at all (a 404 with the error object, even with the admin key), not a route that always
    answers 501."""
    assert set(CALLS) <= set(CONTROL_METHODS), sorted(set(CALLS) - set(CONTROL_METHODS))
    r = httpx.post(
        secured.url + "/admin/update_weights_from_group",
        json={},
        headers=secured.headers("admin"),
        timeout=30.0,
    )
    assert r.status_code == 404, r.text
    assert r.json()["error"]["type"] == "not_found_error"
    assert secured.state()["state"] == "running"


def test_weight_update_from_disk(secured, tmp_path):
    """Weights saved with save_pretrained, loaded through the admin route: /generate reports the new
    version and its greedy tokens change."""
    import torch
    from transformers import AutoModelForCausalLM

    from rollout.presets import resolve_model

    admin = secured.headers("admin")
    body = {"prompt_token_ids": [1, 2, 3], "sampling_params": {"max_tokens": 8, "temperature": 0.0}}
    before = httpx.post(secured.url + "/generate", json=body, headers=secured.headers(), timeout=30).json()
    version = before["weight_version"] + 7  # versions only go up; other tests may have raised it
    path, _ = resolve_model("tiny")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    model.save_pretrained(tmp_path)
    r = httpx.post(
        secured.url + "/admin/update_weights_from_disk",
        json={"path": str(tmp_path), "version": version},
        headers=admin,
        timeout=120.0,
    )
    assert r.status_code == 200, r.text
    after = httpx.post(secured.url + "/generate", json=body, headers=secured.headers(), timeout=30).json()
    assert after["weight_version"] == version
    assert after["outputs"][0]["weight_versions"] == [version] * 8
    assert after["outputs"][0]["token_ids"] != before["outputs"][0]["token_ids"]
    assert_clean(secured)
    # put the original weights back for the other tests
    r = httpx.post(
        secured.url + "/admin/update_weights_from_disk", json={"path": path}, headers=admin, timeout=120.0
    )
    assert r.status_code == 200, r.text
