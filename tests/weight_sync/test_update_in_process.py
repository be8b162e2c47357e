"""Weight updates into an engine in this process: the direct path, disk, validation before any write,
versions on tokens, and sleep/wake (the CPU side of it)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from rollout import LLM, CacheConfig, SamplingParams, SchedulerConfig
from tests.weight_sync.helpers import GREEDY, PROMPTS, assert_same, checkpoints, fingerprint  # noqa: F401

CACHE = CacheConfig(num_blocks=64)


def make(path: str) -> LLM:
    return LLM(path, device="cpu", cache_config=CACHE)


@pytest.fixture(scope="module")
def expected(checkpoints):  # noqa: F811
    return fingerprint(make(checkpoints["new_dir"]).generate(PROMPTS, GREEDY, use_tqdm=False))


def test_update_from_module_equals_fresh_engine_and_versions_tokens(checkpoints, expected):  # noqa: F811
    llm = make(checkpoints["old"])
    before = fingerprint(llm.generate(PROMPTS, GREEDY, use_tqdm=False))
    assert before != expected
    assert llm.update_weights(checkpoints["new_model"]) == 1
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert_same(fingerprint(outs), expected, atol=0)
    assert all(v == 1 for o in outs for v in o.outputs[0].weight_versions)
    assert llm.update_weights(checkpoints["new_model"].named_parameters(), version=7) == 7
    with pytest.raises(ValueError, match="above the current 7"):
        llm.update_weights(checkpoints["new_model"], version=7)
    assert llm.weight_version == 7
    # a state dict works as the pairs do; a bad pause mode is refused even in process
    assert llm.update_weights(checkpoints["new_model"].state_dict()) == 8
    with pytest.raises(ValueError, match="pause mode"):
        llm.update_weights(checkpoints["new_model"], pause="bogus")
    with pytest.raises(ValueError, match="pause mode"):
        llm.update_weights_from_disk(checkpoints["new_dir"], pause="bogus")
    assert llm.weight_version == 8
    llm.engine.check_invariants()


def test_update_from_disk_equals_fresh_engine(checkpoints, expected):  # noqa: F811
    llm = make(checkpoints["old"])
    assert llm.update_weights_from_disk(checkpoints["new_dir"]) == 1
    assert_same(fingerprint(llm.generate(PROMPTS, GREEDY, use_tqdm=False)), expected, atol=0)
    with pytest.raises(ValueError, match="does not exist"):
        llm.update_weights_from_disk(checkpoints["new_dir"] + "-missing")


def bad_updates(model):
    """Updates that go wrong in the middle: each must change nothing."""
    good = [(n, p.detach().clone()) for n, p in model.named_parameters()]
    mid = len(good) // 2
    name, t = good[mid]
    yield "unexpected weight", good[:mid] + [("model.layers.0.mlp.nope.weight", t)] + good[mid:]
    yield "shape mismatch", good[:mid] + [(name, t[..., :-1])] + good[mid + 1 :]
    yield "non-floating dtype", good[:mid] + [(name, t.to(torch.int32))] + good[mid + 1 :]
    yield "missing weights", good[:mid] + good[mid + 1 :]
    yield "twice", good + [good[0]]
    yield "dense tensor holding data", good[:mid] + [(name, t.to("meta"))] + good[mid + 1 :]
    yield "dense tensor holding data", good[:mid] + [(name, t.to_sparse())] + good[mid + 1 :]


def test_a_bad_update_changes_nothing(checkpoints):  # noqa: F811
    llm = make(checkpoints["old"])
    before = fingerprint(llm.generate(PROMPTS, GREEDY, use_tqdm=False))
    params = {n: p.detach().clone() for n, p in llm.engine.runner.model.named_parameters()}
    for message, update in bad_updates(checkpoints["new_model"]):
        with pytest.raises(ValueError, match=message):
            llm.update_weights(update)
        assert llm.weight_version == 0 and llm.engine.weights_valid
    good = list(checkpoints["new_model"].named_parameters())
    for version in (2**63, 2**64):  # beyond int64 (2**64 failed after writing every weight)
        with pytest.raises(ValueError, match="at most"):
            llm.update_weights(good, version=version)
        with pytest.raises(ValueError, match="at most"):
            llm.update_weights_from_disk(checkpoints["new_dir"], version=version)
        assert llm.weight_version == 0 and llm.engine.weights_valid
    for n, p in llm.engine.runner.model.named_parameters():
        assert torch.equal(p, params[n]), n
    assert fingerprint(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == before


def test_a_bad_checkpoint_on_disk_changes_nothing(checkpoints, tmp_path):  # noqa: F811
    llm = make(checkpoints["old"])
    before = fingerprint(llm.generate(PROMPTS, GREEDY, use_tqdm=False))
    tensors = {n: p.detach().clone() for n, p in checkpoints["new_model"].named_parameters()}
    name = sorted(tensors)[len(tensors) // 2]
    tensors[name] = tensors[name][:-1]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="shape mismatch"):
        llm.update_weights_from_disk(str(tmp_path))
    assert llm.weight_version == 0
    assert fingerprint(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == before


def test_update_between_steps_keeps_requests_and_marks_versions(checkpoints):  # noqa: F811
    """Requests in flight continue on the new weights: each token carries the version that made it."""
    llm = make(checkpoints["old"])
    engine = llm.engine
    engine.add_request("r", PROMPTS[0], GREEDY)
    for _ in range(4):
        engine.step()
    engine.update_weights(checkpoints["new_model"].named_parameters())
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    versions = outs[0].outputs[0].weight_versions
    assert versions == [0] * 4 + [1] * 8  # 4 steps: the prompt + 1st token, then 3 more
    engine.check_invariants()


def test_prefix_cache_never_serves_kv_of_older_weights(checkpoints, expected):  # noqa: F811
    llm = make(checkpoints["old"])
    plain = SamplingParams(max_tokens=4, temperature=0)  # prompt logprobs would bypass the cache
    llm.generate(PROMPTS, plain, use_tqdm=False)
    assert llm.generate(PROMPTS, plain, use_tqdm=False)[0].num_cached_tokens > 0
    llm.update_weights(checkpoints["new_model"])
    assert all(o.num_cached_tokens == 0 for o in llm.generate(PROMPTS, plain, use_tqdm=False))
    assert llm.generate(PROMPTS, plain, use_tqdm=False)[0].num_cached_tokens > 0  # new version's KV
    assert_same(fingerprint(llm.generate(PROMPTS, GREEDY, use_tqdm=False)), expected, atol=0)


def drain(engine, watch: str | None = None) -> tuple[dict, list[int] | None]:
    """Step until idle: the outputs by id, and ``watch``'s tokens when it was first preempted."""
    outs, snap = {}, None
    while engine.has_unfinished():
        outs.update((o.request_id, o) for o in engine.step())
        sched = engine.scheduler
        req = next((r for r in (*sched.running, *sched.waiting) if r.request_id == watch), None)
        if snap is None and req is not None and req.num_preemptions:
            snap = list(req.token_ids)  # recomputed from here, under the current weights
    return outs, snap


def fresh_greedy(path: str, prompt: list[int], max_tokens: int, block_size: int = 16):
    llm = LLM(
        path, device="cpu", cache_config=CacheConfig(block_size, num_blocks=128, enable_prefix_caching=False)
    )
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    return llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]


def test_kv_in_flight_at_an_update_is_never_cached(checkpoints):  # noqa: F811
    """A request holding KV computed under the old weights when an update lands never registers
    its blocks, until a preemption recomputes it: (a) a prompt shorter than a block, filling it
    after the update (its block was cached under the new salt and served to another request); (b)
    one mid-prefill at the update, preempted later, that matched its own mixed block again."""
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    e = LLM(checkpoints["old"], device="cpu", cache_config=CacheConfig(num_blocks=64)).engine
    a_prompt = [5, 17, 42, 99, 7, 3, 250, 11, 64, 8]
    e.add_request("a", a_prompt, greedy)
    for _ in range(3):
        e.step()
    e.update_weights_from_disk(checkpoints["new_dir"])
    a = drain(e)[0]["a"].outputs[0]
    b_prompt = (a_prompt + a.token_ids)[:16] + [1, 2, 3]
    e.add_request("b", b_prompt, greedy)
    b = drain(e)[0]["b"].outputs[0]
    want = fresh_greedy(checkpoints["new_dir"], b_prompt, 12)
    assert b.num_cached_tokens == 0 and b.token_ids == want.token_ids
    assert max(abs(x - y) for x, y in zip(b.logprobs, want.logprobs, strict=True)) < 1e-5

    llm = LLM(
        checkpoints["old"],
        device="cpu",
        cache_config=CacheConfig(block_size=4, num_blocks=16),
        scheduler_config=SchedulerConfig(max_num_batched_tokens=3),
    )
    e = llm.engine
    e.add_request("b", list(range(30, 50)), SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    for _ in range(8):
        e.step()
    e.add_request(
        "a", [5, 17, 42, 99, 7, 3, 250, 11], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    )
    e.step()  # a's first block half computed under the old weights
    e.update_weights_from_disk(checkpoints["new_dir"])
    outs, ctx = drain(e, watch="a")
    assert ctx is not None  # the pressure preempted it
    a = outs["a"].outputs[0]
    done = len(ctx) - 8
    want = fresh_greedy(checkpoints["new_dir"], ctx, len(a.token_ids) - done, block_size=4)
    assert a.token_ids[done:] == want.token_ids
    assert max(abs(x - y) for x, y in zip(a.logprobs[done:], want.logprobs, strict=True)) < 1e-5
    e.check_invariants()


def test_sleep_and_wake_keep_outputs(checkpoints, expected):  # noqa: F811
    llm = make(checkpoints["old"])
    before = fingerprint(llm.generate(PROMPTS, GREEDY, use_tqdm=False))
    for bad in (True, 1.0, 3):  # True and 1.0 were taken as level 1
        with pytest.raises(ValueError, match="sleep level"):
            llm.sleep(bad)
    info = llm.sleep(1)
    assert info["kv_cache_bytes"] > 0 and info["weight_bytes"] > 0
    assert all(p.numel() == 0 for p in llm.engine.runner.model.parameters())
    with pytest.raises(RuntimeError, match="asleep"):
        llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    llm.engine.check_invariants()  # the refused requests were aborted, their blocks freed
    with pytest.raises(ValueError, match="already asleep"):
        llm.sleep(2)
    llm.wake_up()
    assert fingerprint(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == before
    # Level 2 drops the weights: wake them, send new ones, then wake the KV cache.
    llm.sleep(2)
    llm.wake_up(["weights"])
    with pytest.raises(RuntimeError, match="asleep"):
        llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    llm.update_weights(checkpoints["new_model"])
    llm.wake_up(["kv_cache"])
    assert_same(fingerprint(llm.generate(PROMPTS, GREEDY, use_tqdm=False)), expected, atol=0)
    with pytest.raises(ValueError, match="tags"):
        llm.wake_up(["gpu"])


def test_level_2_sleep_refuses_to_serve_until_weights_arrive(checkpoints):  # noqa: F811
    llm = make(checkpoints["old"])
    llm.sleep(2)
    llm.wake_up()
    assert not llm.engine.weights_valid
    with pytest.raises(RuntimeError, match="incomplete"):
        llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    llm.update_weights_from_disk(checkpoints["old"])
    assert llm.engine.weights_valid and llm.generate(PROMPTS, GREEDY, use_tqdm=False)
