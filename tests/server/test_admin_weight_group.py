"""Weight updates over a real gloo process group, driven through the HTTP admin routes of a real
`rollout serve` process: the test process is the trainer. It hosts the group, has the engine join it
(``/admin/init_weight_group``), opens an update (``/admin/begin_weight_update``, the manifest) and
broadcasts the buckets while ``/admin/receive_weight_buckets`` runs. Then: the responses carry the new
version; greedy outputs equal a fresh in-process engine on the same weights; bad updates change
nothing; the routes need the admin key; the group is destroyed and a second one works. Last, the same
through ``HTTPRolloutClient`` (a ``WeightSender``'s control channel)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from rollout.weight_sync.manifest import DTYPES, Manifest, plan_buckets
from rollout.weight_sync.process_group import WeightGroup
from tests.server.conftest import Server, assert_clean

HOST = "127.0.0.1"
PROMPTS = [[5, 17, 42, 99, 7, 3, 250, 11], [4, 4, 8, 15, 16, 23, 42]]
GREEDY = {"max_tokens": 10, "temperature": 0.0, "ignore_eos": True, "detokenize": False}
GROUP_ROUTES = (
    "init_weight_group",
    "begin_weight_update",
    "receive_weight_buckets",
    "weight_bucket",
    "finish_weight_update",
    "abort_weight_update",
    "destroy_weight_group",
)


def admin(server: Server, method: str, timeout: float = 60.0, **body: object) -> httpx.Response:
    return httpx.post(
        f"{server.url}/admin/{method}", json=body, headers=server.headers("admin"), timeout=timeout
    )


def ok(r: httpx.Response) -> object:
    assert r.status_code == 200, r.text
    return r.json()["result"]


def greedy(server: Server) -> list[dict]:
    """Per prompt: the response's weight version, greedy tokens, their logprobs and versions."""
    out = []
    with server.client() as c:
        for p in PROMPTS:
            body = c.post("/generate", json={"prompt_token_ids": p, "sampling_params": GREEDY}).json()
            s = body["outputs"][0]
            out.append({k: s[k] for k in ("token_ids", "logprobs", "weight_versions")})
            out[-1]["weight_version"] = body["weight_version"]
    return out


def info(server: Server) -> dict:
    r = httpx.get(f"{server.url}/admin/info", headers=server.headers("admin"), timeout=30.0)
    assert r.status_code == 200, r.text
    return r.json()


def _served_dir() -> str:
    from rollout.presets import resolve_model

    return resolve_model("tiny")[0]


def trainer_model(seed: int) -> torch.nn.Module:
    """The served tiny architecture with other random weights (fp32, as a trainer holds them)."""
    from transformers import AutoConfig

    from tests.models.tiny_models import tiny_hf_model

    return tiny_hf_model(AutoConfig.from_pretrained(_served_dir()), seed)


def served_model() -> torch.nn.Module:
    """The served weights, as a trainer would load them (fp32)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(_served_dir(), dtype=torch.float32)


def reference(model: torch.nn.Module, dtype: str, path) -> list[tuple[list[int], list[float]]]:
    """Greedy tokens and logprobs of a fresh in-process engine loaded from ``model`` saved to disk."""
    from rollout import LLM, CacheConfig, SamplingParams

    model.save_pretrained(path)
    with LLM(str(path), device="cpu", dtype=dtype, cache_config=CacheConfig(num_blocks=64)) as llm:
        outs = llm.generate(PROMPTS, SamplingParams(**GREEDY), use_tqdm=False)
    return [(list(o.outputs[0].token_ids), list(o.outputs[0].logprobs)) for o in outs]


def join_group(server: Server, pool: ThreadPoolExecutor) -> WeightGroup:
    """Host a group on a free port; the engine joins it through the admin route (answered once joined)."""
    store = WeightGroup.host_store(HOST, 0, 2, 60.0)
    port = store.port
    joined = pool.submit(
        admin, server, "init_weight_group", host=HOST, port=port, rank=1, world_size=2, timeout_s=60.0
    )
    group = WeightGroup(HOST, port, 0, 2, "gloo", torch.device("cpu"), 60.0, store=store)
    assert ok(joined.result(60)) is True
    return group


def push(server: Server, pool: ThreadPoolExecutor, group: WeightGroup, manifest: Manifest, tensors) -> int:
    """One update: the manifest, then every bucket broadcast while the engine receives them."""
    expected = ok(admin(server, "begin_weight_update", manifest=manifest.to_wire(), version=None, pause=None))
    receiving = pool.submit(admin, server, "receive_weight_buckets")
    group.send(manifest, iter(tensors))
    version = ok(receiving.result(60))
    assert version == expected
    return version


def manifest_of(pairs, dtype: torch.dtype) -> Manifest:
    # 16 KiB buckets: the tiny model travels in dozens of them
    return plan_buckets(((n, tuple(t.shape), dtype) for n, t in pairs), bucket_bytes=16 << 10)


def test_weight_group_routes_refused_without_key_or_admin(secured, open_server):
    for method in GROUP_ROUTES:
        for headers in ({}, secured.headers("api"), {"Authorization": "Bearer nope"}):
            assert httpx.post(f"{secured.url}/admin/{method}", json={}, headers=headers).status_code == 401
        assert httpx.post(f"{open_server.url}/admin/{method}", json={}).status_code == 404
    assert httpx.get(f"{secured.url}/admin/info", headers=secured.headers("api")).status_code == 401
    assert httpx.get(f"{open_server.url}/admin/info").status_code == 404
    # with the key but nothing open: a 400 naming what is missing, and the engine keeps running
    r = admin(secured, "receive_weight_buckets")
    assert r.status_code == 400 and "begin_weight_update" in r.json()["error"]["message"], r.text
    assert admin(secured, "weight_bucket", index=0).status_code == 400
    assert ok(admin(secured, "abort_weight_update")) is False
    assert ok(admin(secured, "destroy_weight_group")) is False
    state = secured.state()
    assert state["state"] == "running" and not state["weight_group"]


def test_push_over_a_gloo_group_through_the_admin_routes(secured, tmp_path):
    engine = info(secured)
    assert engine["device"] == "cpu" and engine["dtype"] in DTYPES
    wire = DTYPES[engine["dtype"]]
    before = greedy(secured)
    v0 = before[0]["weight_version"]
    model = trainer_model(seed=3)
    new = [(n, p.detach()) for n, p in model.named_parameters()]
    try:
        with ThreadPoolExecutor(2) as pool:
            group = join_group(secured, pool)
            assert secured.state()["weight_group"]
            manifest = manifest_of(new, wire)
            assert manifest.num_buckets > 10
            assert push(secured, pool, group, manifest, (t for _, t in new)) == v0 + 1
            after = greedy(secured)
            for o in after:
                assert o["weight_version"] == v0 + 1 and o["weight_versions"] == [v0 + 1] * 10
            assert [o["token_ids"] for o in after] != [o["token_ids"] for o in before]
            for o, (tokens, logprobs) in zip(after, reference(model, engine["dtype"], tmp_path), strict=True):
                assert o["token_ids"] == tokens
                assert max(abs(a - b) for a, b in zip(o["logprobs"], logprobs, strict=True)) < 1e-4

            # bad updates: refused before a byte moves; the same weights and version keep serving
            mid = len(new) // 2
            wrong_shape = [*new[:mid], (new[mid][0], new[mid][1][:-1]), *new[mid + 1 :]]
            wrong_name = [*new[:mid], ("model.layers.0.mlp.nope.weight", new[mid][1]), *new[mid + 1 :]]
            for bad, words in ((wrong_shape, "shape"), (wrong_name, "nope")):
                r = admin(secured, "begin_weight_update", manifest=manifest_of(bad, wire).to_wire())
                assert r.status_code == 400 and words in r.json()["error"]["message"], r.text
            r = admin(secured, "begin_weight_update", manifest={"entries": [1], "bucket_sizes": [4]})
            assert r.status_code == 400, r.text
            # an update opened then dropped (the trainer failed before sending) changes nothing either
            assert ok(admin(secured, "begin_weight_update", manifest=manifest.to_wire())) == v0 + 2
            assert secured.state(False)["state"] == "updating_weights"
            assert ok(admin(secured, "abort_weight_update")) is True
            state = secured.state()
            assert state["state"] == "running" and state["weights_valid"] and state["weight_group"]
            assert state["weight_version"] == v0 + 1
            assert greedy(secured) == after

            # destroy the group; a second group carries the next update (the served weights back)
            assert ok(admin(secured, "destroy_weight_group")) is True
            group.close()
            assert not secured.state()["weight_group"]
            group = join_group(secured, pool)
            served = [(n, p.detach()) for n, p in served_model().named_parameters()]
            assert push(secured, pool, group, manifest_of(served, wire), (t for _, t in served)) == v0 + 2
            restored = greedy(secured)
            assert [o["token_ids"] for o in restored] == [o["token_ids"] for o in before]
            assert all(o["weight_versions"] == [v0 + 2] * 10 for o in restored)
            assert ok(admin(secured, "destroy_weight_group")) is True
            group.close()
    finally:
        # whatever failed above, leave the served weights and no group for the other tests
        admin(secured, "abort_weight_update")
        admin(secured, "destroy_weight_group")
        r = admin(secured, "update_weights_from_disk", timeout=120.0, path=_served_dir(), pause=None)
        assert r.status_code == 200, r.text
    assert_clean(secured)


def test_http_client_pushes_through_a_weight_sender(secured):
    from rollout import SamplingParams
    from rollout.integrations.rollout_client import HTTPRolloutClient
    from rollout.weight_sync.sender import WeightSender

    client = HTTPRolloutClient(
        secured.url, api_key=secured.api_key, admin_key=secured.admin_key, timeout_s=60
    )
    before = greedy(secured)
    v0 = client.weight_version
    assert client.info.device == "cpu"
    try:
        with WeightSender(client, bucket_bytes=32 << 10, timeout_s=60.0) as sender:
            assert sender.push(trainer_model(seed=4)) == v0 + 1 and sender.last_transport == "gloo"
            assert secured.state()["weight_group"]
            bad = [(n, p[:1]) for n, p in trainer_model(seed=4).named_parameters()]
            with pytest.raises(ValueError, match="shape"):
                sender.push(bad)
            assert client.weight_version == v0 + 1
            moved = greedy(secured)
            assert [o["token_ids"] for o in moved] != [o["token_ids"] for o in before]
            assert sender.push(trainer_model(seed=4), version=v0 + 7) == v0 + 7  # the group is reused
            assert greedy(secured)[0]["token_ids"] == moved[0]["token_ids"]
        assert not secured.state()["weight_group"]  # closing the sender destroyed the group
        # the client's own update_weights: a sender of its own, a new group
        assert client.update_weights(served_model()) == v0 + 8
        after = greedy(secured)
        assert [o["token_ids"] for o in after] == [o["token_ids"] for o in before]
        assert all(o["weight_versions"] == [v0 + 8] * 10 for o in after)
        batch = client.generate(PROMPTS, n=1, params=SamplingParams(max_tokens=4, detokenize=False))
        assert batch.min_weight_version == v0 + 8
    finally:
        client.close()
        admin(secured, "destroy_weight_group")
    assert not secured.state()["weight_group"]
    assert_clean(secured)
