"""An open bucketed update holds a lease: a sender that goes silent (a trainer killed between
``begin_weight_update`` and its buckets) has its update ended by the engine, which serves again on
the old weights, instead of holding every request forever."""

from __future__ import annotations

import time

import pytest

from rollout import LLM, CacheConfig, SamplingParams
from rollout.control import ControlPlane
from rollout.engine import EngineCore
from rollout.messages import AddRequest, ControlAck, ControlCall, Outputs
from rollout.weight_sync import WeightSender
from rollout.weight_sync.manifest import plan_buckets
from tests.weight_sync.helpers import PROMPTS, assert_same, checkpoints, fingerprint  # noqa: F401

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, prompt_logprobs=0)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def manifest_of(model) -> dict:
    return plan_buckets([(n, tuple(p.shape), p.dtype) for n, p in model.named_parameters()]).to_wire()


def test_a_silent_sender_loses_its_update_and_held_requests_run(checkpoints):  # noqa: F811
    clock = Clock()
    plane = ControlPlane(
        EngineCore(checkpoints["old"], device="cpu", cache_config=CacheConfig(num_blocks=64)), clock
    )
    plane.engine.weights.group = object()  # stands for an open weight group (begin only checks it is there)
    assert plane.lease_left_s() is None and not plane.expire_lease()
    plane.handle(
        ControlCall(
            1, "begin_weight_update", {"manifest": manifest_of(checkpoints["new_model"]), "lease_s": 30}
        )
    )
    plane.handle(AddRequest("held", [5, 6, 7], None, GREEDY.to_dict()))
    assert plane.state.value == "updating_weights" and plane.lease_left_s() == 30
    clock.now += 29.5
    assert not plane.expire_lease() and plane.engine.weights.in_progress and not plane.can_step
    clock.now += 0.5
    assert plane.lease_left_s() == 0 and plane.expire_lease()
    assert plane.state.value == "running" and not plane.engine.weights.in_progress
    assert plane.engine.weights_valid and plane.engine.weight_version == 0
    assert plane.lease_left_s() is None and not plane.expire_lease()  # once
    while plane.can_step:
        plane.step()
    done = [s for m in plane.outbox if isinstance(m, Outputs) for d in m.deltas for s in d.samples]
    assert [s.finish_reason for s in done if s.finish_reason] == ["length"]  # ran to its 6 tokens
    plane.outbox.clear()
    plane.handle(ControlCall(2, "finish_weight_update", {}))  # the sender, had it come back late
    plane.handle(ControlCall(3, "get_state", {}))
    late, state = (m for m in plane.outbox if isinstance(m, ControlAck))
    assert not late.ok and "no weight update in progress" in late.error
    assert state.result["num_expired_updates"] == 1


@pytest.mark.parametrize("lease_s", [0, -1, float("nan"), float("inf"), 1e10, True, "60"])
def test_a_bad_lease_is_refused_and_opens_nothing(checkpoints, lease_s):  # noqa: F811
    plane = ControlPlane(
        EngineCore(checkpoints["old"], device="cpu", cache_config=CacheConfig(num_blocks=32))
    )
    plane.engine.weights.group = object()
    plane.handle(
        ControlCall(
            1, "begin_weight_update", {"manifest": manifest_of(checkpoints["new_model"]), "lease_s": lease_s}
        )
    )
    (ack,) = plane.outbox
    assert not ack.ok and "lease_s" in ack.error and ack.error.startswith("ValueError")
    assert plane.state.value == "running" and not plane.engine.weights.in_progress


def test_the_core_process_ends_an_abandoned_update_by_itself(checkpoints):  # noqa: F811
    """A real engine process over a real gloo group: an update opened and then abandoned (no
    buckets, no abort) ends after its lease with no further call; the held request then runs on the
    old weights and the next push works."""
    with (
        LLM(
            checkpoints["old"], multiprocess=True, device="cpu", cache_config=CacheConfig(num_blocks=64)
        ) as llm,
        WeightSender(llm, timeout_s=60) as sender,
    ):
        assert sender.push(checkpoints["new_model"]) == 1  # opens the group
        expected = fingerprint(llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False))
        manifest = manifest_of(checkpoints["new_model"])
        t0 = time.monotonic()  # before the lease starts (one monotonic clock for both processes)
        llm.client.call("begin_weight_update", manifest=manifest, lease_s=1.0)
        assert llm.client.call("get_state")["state"] == "updating_weights"
        llm.client.send(AddRequest("held", PROMPTS[0], None, GREEDY.to_dict()))  # held meanwhile
        finished: list[str | None] = []
        while not finished and time.monotonic() - t0 < 30:
            for msg in llm.client.recv(1.0):
                assert isinstance(msg, Outputs), msg
                finished += [s.finish_reason for d in msg.deltas for s in d.samples if s.finish_reason]
        assert finished == ["length"] and time.monotonic() - t0 >= 1.0  # ran once the lease ran out
        assert_same(fingerprint(llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)), expected)  # old weights
        state = llm.client.call("get_state")
        assert state["num_expired_updates"] == 1 and state["weight_version"] == 1
        assert sender.push(checkpoints["new_model"]) == 2
