"""An expired lease ends an update as abort_weight_update would, drain included; exclusive calls
deferred by pause="wait" are checked again when the drain ends (found by the stop-27 lease fuzzer)."""

from __future__ import annotations

import pytest

from rollout import CacheConfig, SamplingParams
from rollout.control import ControlPlane
from rollout.engine import EngineCore
from rollout.messages import AbortRequests, AddRequest, ControlAck, ControlCall
from tests.weight_sync.helpers import checkpoints  # noqa: F401
from tests.weight_sync.test_update_lease import Clock, manifest_of

LONG = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


def acks(plane: ControlPlane) -> dict[int, ControlAck]:
    return {m.call_id: m for m in plane.outbox if isinstance(m, ControlAck)}


def draining_plane(checkpoints, clock=None) -> ControlPlane:  # noqa: F811
    plane = ControlPlane(
        EngineCore(checkpoints["old"], device="cpu", cache_config=CacheConfig(num_blocks=64)),
        *([clock] if clock else []),
    )
    plane.engine.weights.group = object()  # stands for an open weight group
    plane.handle(AddRequest("a", [5, 6, 7], None, LONG.to_dict()))
    plane.step()
    plane.handle(ControlCall(1, "pause", {"mode": "wait"}))  # answered once "a" is done
    assert plane.state.value == "draining" and 1 not in acks(plane)
    return plane


@pytest.mark.parametrize("pause", ["abort", "keep"])
def test_an_expired_update_that_stopped_a_drain_ends_the_drain(checkpoints, pause):  # noqa: F811
    clock = Clock()
    plane = draining_plane(checkpoints, clock)
    manifest = manifest_of(checkpoints["new_model"])
    plane.handle(ControlCall(2, "begin_weight_update", {"manifest": manifest, "pause": pause, "lease_s": 5}))
    assert acks(plane)[2].ok and plane.state.value == "updating_weights"
    plane.handle(AbortRequests(["a"]))  # "keep": the drained request ends while the update is open
    clock.now += 5
    assert plane.expire_lease()
    # as abort_weight_update: the drain has nothing left, so the pause(wait) is answered now (the
    # core loop does not step an engine with nothing in flight: nothing else would answer it)
    assert plane.state.value == "paused" and not plane.can_step
    assert acks(plane)[1].ok and acks(plane)[1].result == "paused"


def test_an_expired_update_runs_the_calls_that_waited_for_the_drain(checkpoints):  # noqa: F811
    clock = Clock()
    plane = ControlPlane(
        EngineCore(checkpoints["old"], device="cpu", cache_config=CacheConfig(num_blocks=64)), clock
    )
    plane.engine.weights.group = object()
    plane.handle(AddRequest("a", [5, 6, 7], None, LONG.to_dict()))
    plane.handle(ControlCall(1, "sleep", {"level": 1, "pause": "wait"}))  # waits for "a"
    manifest = manifest_of(checkpoints["new_model"])
    plane.handle(
        ControlCall(2, "begin_weight_update", {"manifest": manifest, "pause": "abort", "lease_s": 5})
    )
    assert acks(plane)[2].ok and 1 not in acks(plane)
    clock.now += 5
    assert plane.expire_lease()
    assert acks(plane)[1].ok and plane.state.value == "sleeping"


def test_deferred_calls_are_refused_when_an_earlier_one_left_the_engine_busy(checkpoints):  # noqa: F811
    plane = draining_plane(checkpoints)
    manifest = manifest_of(checkpoints["new_model"])
    plane.handle(ControlCall(2, "begin_weight_update", {"manifest": manifest, "pause": "wait"}))
    plane.handle(ControlCall(3, "sleep", {"level": 1, "pause": "wait"}))
    plane.handle(
        ControlCall(4, "update_weights_from_disk", {"path": checkpoints["new_dir"], "pause": "wait"})
    )
    plane.handle(AbortRequests(["a"]))  # drain over: the begin opens its update, the others are refused
    got = acks(plane)
    assert got[1].ok and got[2].ok
    for cid in (3, 4):  # not run inside the open update (it used to sleep / overwrite, then "resume")
        assert not got[cid].ok and got[cid].error.startswith("ValueError: the engine is updating_weights")
    assert plane.state.value == "updating_weights" and plane.engine.weights.in_progress
    assert plane.engine.memory.level == 0 and plane.engine.weight_version == 0
    plane.handle(ControlCall(5, "abort_weight_update", {}))
    assert plane.state.value == "paused" and acks(plane)[5].ok  # back to the pause(wait)'s paused


@pytest.mark.parametrize("end", ["finish_weight_update", "abort_weight_update", "lease"])
def test_waking_the_kv_cache_keeps_an_update_opened_in_the_sleep_open(checkpoints, end):  # noqa: F811
    """Colocated order wake weights, begin, wake KV cache (before the buckets): the engine holds
    requests until the update ends, then returns to the state before the sleep."""
    clock = Clock()
    plane = ControlPlane(
        EngineCore(checkpoints["old"], device="cpu", cache_config=CacheConfig(num_blocks=64)), clock
    )
    plane.engine.weights.group = object()
    plane.handle(ControlCall(1, "sleep", {"level": 1}))
    plane.handle(ControlCall(2, "wake_up", {"tags": ["weights"]}))
    manifest = manifest_of(checkpoints["new_model"])
    plane.handle(ControlCall(3, "begin_weight_update", {"manifest": manifest, "lease_s": 5}))
    plane.handle(ControlCall(4, "wake_up", {"tags": ["kv_cache"]}))
    assert all(a.ok for a in acks(plane).values()) and acks(plane)[4].result["state"] == "updating_weights"
    plane.handle(AddRequest("a", [5, 6, 7], None, LONG.to_dict()))
    assert plane.state.value == "updating_weights" and not plane.can_step  # held: buckets may come
    if end == "lease":
        clock.now += 5
        assert plane.expire_lease()
    else:  # (finish with no bucket sent fails, and ends the update as an abort does)
        plane.handle(ControlCall(5, end, {}))
    assert plane.state.value == "running" and not plane.engine.weights.in_progress
    assert "a" in plane.engine.request_ids and plane.can_step


def test_a_deferred_begin_refused_when_it_runs_is_answered_once(checkpoints):  # noqa: F811
    plane = draining_plane(checkpoints)
    manifest = manifest_of(checkpoints["new_model"])
    plane.handle(ControlCall(2, "sleep", {"level": 1, "pause": "wait"}))
    plane.handle(ControlCall(3, "begin_weight_update", {"manifest": manifest, "pause": "wait"}))
    plane.handle(AbortRequests(["a"]))  # the drain ends: the sleep runs, the begin is refused
    got = acks(plane)
    assert got[2].ok and not got[3].ok and plane.state.value == "sleeping"
    plane.outbox.clear()
    plane.handle(ControlCall(4, "abort_weight_update", {}))  # its sender gives up
    assert [(m.call_id, m.ok, m.result) for m in plane.outbox] == [(4, True, False)]  # not 3 again
