"""Weight updates that fail or are refused (audit of stop 26): each leaves the old weights, the old
version and a serving engine, answers with a ValueError (never kills the core), and does not touch
the requests in flight; a second sender is refused at once."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from rollout import LLM, CacheConfig, SamplingParams
from rollout.control import ControlPlane
from rollout.engine import MAX_WEIGHT_VERSION, EngineCore
from rollout.messages import AddRequest, ControlAck, ControlCall, Outputs
from rollout.weight_sync import WeightSender
from rollout.weight_sync.manifest import plan_buckets
from tests.weight_sync.helpers import checkpoints  # noqa: F401

ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def plane_on(path: str) -> ControlPlane:
    return ControlPlane(EngineCore(path, device="cpu", cache_config=CacheConfig(num_blocks=320)))


def start_requests(plane: ControlPlane, n: int, max_tokens: int = 60) -> None:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True).to_dict()
    for k in range(n):
        plane.handle(AddRequest(f"r{k}", [5 + k, 6, 7, 8], None, params))
    plane.step()
    plane.step()
    plane.outbox.clear()


def acks(plane: ControlPlane) -> list[ControlAck]:
    return [m for m in plane.outbox if isinstance(m, ControlAck)]


def finish_reasons(plane: ControlPlane) -> list[str | None]:
    return [
        s.finish_reason for m in plane.outbox if isinstance(m, Outputs) for d in m.deltas for s in d.samples
    ]


def hf_specs(model) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    return [(n, tuple(p.shape), p.dtype) for n, p in model.named_parameters()]


@pytest.fixture(scope="module")
def proc_llm(checkpoints):  # noqa: F811
    with LLM(
        checkpoints["old"],
        multiprocess=True,
        device="cpu",
        cache_config=CacheConfig(num_blocks=320),
        env=ONE_THREAD,
    ) as llm:
        yield llm


# ---- bug 1: a meta / sparse tensor in the middle of a bucketed push --------------------------------
@pytest.mark.parametrize("kind", ["meta", "sparse"])
def test_a_bucketed_push_with_a_tensor_holding_no_dense_data_changes_nothing(proc_llm, checkpoints, kind):  # noqa: F811
    good = [(n, p.detach().clone()) for n, p in checkpoints["new_model"].named_parameters()]
    mid = len(good) // 2
    name, t = good[mid]
    bad = good[:mid] + [(name, t.to("meta") if kind == "meta" else t.to_sparse())] + good[mid + 1 :]
    version = proc_llm.weight_version
    sender = WeightSender(proc_llm, bucket_bytes=64 << 10, timeout_s=10)
    with sender, pytest.raises(ValueError, match="dense tensor holding data"):
        sender.push(bad)
    state = proc_llm.client.call("get_state")
    assert state["state"] == "running" and state["weights_valid"] and state["weight_version"] == version


# ---- bug 2: a begin whose sender gave up waiting for the drain --------------------------------------
def test_abort_withdraws_a_begin_still_waiting_for_the_drain(checkpoints):  # noqa: F811
    plane = plane_on(checkpoints["old"])
    plane.engine.weights.group = object()  # stands for an open weight group (begin only checks it is there)
    start_requests(plane, 2, max_tokens=20)
    manifest = plan_buckets(hf_specs(checkpoints["new_model"])).to_wire()
    plane.handle(ControlCall(1, "begin_weight_update", {"manifest": manifest, "pause": "wait"}))
    assert not acks(plane) and plane.state.value == "draining"
    plane.handle(ControlCall(2, "abort_weight_update", {}))  # what a sender that timed out sends
    while plane.engine.has_unfinished():
        plane.step()
    assert not plane.engine.weights.in_progress
    assert plane.state.value == "running"
    by_id = {a.call_id: a for a in acks(plane)}
    assert not by_id[1].ok and by_id[2].ok


def test_a_push_that_times_out_in_the_drain_leaves_the_engine_serving(proc_llm, checkpoints):  # noqa: F811
    params = SamplingParams(max_tokens=120, temperature=0, ignore_eos=True).to_dict()
    with WeightSender(proc_llm) as sender:
        sender.push(checkpoints["new_model"])  # opens the group
        for k in range(32):
            proc_llm.client.send(AddRequest(f"t{k}", [5 + k, 6, 7, 8], None, params))
        sender.timeout_s = 0.05  # shorter than the drain of 32 x 120 tokens
        with pytest.raises(TimeoutError):
            sender.push(checkpoints["new_model"], pause="wait")
        sender.timeout_s = 60
        deadline = time.monotonic() + 60
        while proc_llm.client.call("get_state")["num_requests"] and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        assert proc_llm.client.call("get_state")["state"] == "running"
        version = proc_llm.weight_version
        assert sender.push(checkpoints["new_model"]) == version + 1


# ---- bug 3: a second sender to an engine that is in a group already --------------------------------
def test_a_second_sender_gets_the_engines_refusal_at_once(proc_llm, checkpoints):  # noqa: F811
    with WeightSender(proc_llm) as first:
        first.push(checkpoints["new_model"])
        # the engine's refusal, not the group rendezvous timing out (DistStoreError after timeout_s)
        second = WeightSender(proc_llm, timeout_s=30)
        with pytest.raises(ValueError, match="already open"):
            second.push(checkpoints["new_model"])
        # checked before hosting: no rendezvous thread left waiting out its 30 s (a process that
        # exited meanwhile aborted in the store's destructor: "terminate called without an active
        # exception")
        assert not [t for t in threading.enumerate() if t.name == "rollout-weight-group"]
        first.push(checkpoints["new_model"])  # the first sender still works


# ---- bug 4: bad input that raised other than ValueError (and killed an engine process) -------------
def test_a_weight_directory_name_too_long_is_a_value_error(checkpoints):  # noqa: F811
    llm = LLM(checkpoints["old"], device="cpu", cache_config=CacheConfig(num_blocks=32))
    with pytest.raises(ValueError, match="weight directory"):
        llm.update_weights_from_disk("/tmp/" + "x" * 300)
    assert llm.weight_version == 0


def test_bad_weight_control_arguments_are_answered_not_fatal(checkpoints):  # noqa: F811
    plane = plane_on(checkpoints["old"])
    args = dict(host="127.0.0.1", port=29999, rank=1, world_size=2, backend="gloo", timeout_s=1e300)
    plane.handle(ControlCall(1, "init_weight_group", args))  # an escaping exception kills the core
    plane.handle(ControlCall(2, "update_weights_from_disk", {"path": "/tmp/" + "x" * 300}))
    (a1, a2) = acks(plane)
    assert not a1.ok and a1.error.startswith("ValueError") and "timeout_s" in a1.error
    assert not a2.ok and a2.error.startswith("ValueError")


# ---- bug 5: a refused update must not abort (or drain) the requests in flight ---------------------
def test_a_refused_update_with_pause_abort_keeps_the_requests(checkpoints, tmp_path):  # noqa: F811
    plane = plane_on(checkpoints["old"])
    start_requests(plane, 2)
    bad_manifest = hf_specs(checkpoints["new_model"])
    bad_manifest[3] = (bad_manifest[3][0], (1, 1), torch.float32)
    calls = [
        ("update_weights_from_disk", {"path": str(tmp_path / "missing")}),
        ("update_weights_from_disk", {"path": checkpoints["new_dir"], "version": 0}),
        ("begin_weight_update", {"manifest": plan_buckets(bad_manifest).to_wire()}),
    ]
    for i, (method, args) in enumerate(calls):
        plane.handle(ControlCall(i, method, {**args, "pause": "abort"}))
        (ack,) = acks(plane)
        assert not ack.ok and ack.error.startswith("ValueError"), ack
        assert "abort" not in finish_reasons(plane), method
        assert plane.engine.has_unfinished() and plane.state.value == "running"
        plane.outbox.clear()


# ---- bug 6: the version may not leave int64 ----------------------------------------------------
def test_no_version_past_the_largest_changes_nothing(checkpoints):  # noqa: F811
    llm = LLM(checkpoints["old"], device="cpu", cache_config=CacheConfig(num_blocks=32))
    assert llm.update_weights_from_disk(checkpoints["old"], version=MAX_WEIGHT_VERSION) == MAX_WEIGHT_VERSION
    params = {n: p.detach().clone() for n, p in llm.engine.runner.model.named_parameters()}
    with pytest.raises(ValueError, match="largest"):
        llm.update_weights(checkpoints["new_model"])
    assert llm.weight_version == MAX_WEIGHT_VERSION and llm.engine.weights_valid
    for n, p in llm.engine.runner.model.named_parameters():
        assert torch.equal(p, params[n]), n


def test_init_weight_group_check_only_joins_nothing(checkpoints):  # noqa: F811
    """``check_only``: the engine answers at once whether it would join (a sender asks before it
    hosts a rendezvous), and joins nothing either way."""
    plane = plane_on(checkpoints["old"])
    args = dict(host="127.0.0.1", port=29999, rank=1, world_size=2, backend="gloo", timeout_s=5)
    plane.handle(ControlCall(1, "init_weight_group", {**args, "check_only": True}))
    plane.handle(ControlCall(2, "init_weight_group", {**args, "backend": "mpi", "check_only": True}))
    plane.engine.weights.group = object()  # stands for another sender's open group
    plane.handle(ControlCall(3, "init_weight_group", {**args, "check_only": True}))
    ok, bad_backend, taken = acks(plane)
    assert ok.ok and ok.result is True
    assert not bad_backend.ok and "backend must be one of" in bad_backend.error
    assert not taken.ok and "already open" in taken.error
