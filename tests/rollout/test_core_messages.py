"""Messages, streaming deltas and the control-plane state machine, in-process (no sockets)."""

from __future__ import annotations

import pickle

import msgpack
import pytest
import torch

from rollout import CacheConfig, EngineCore, SamplingParams
from rollout.control import ControlPlane, EngineState
from rollout.messages import (
    AbortRequests,
    AddRequest,
    ControlAck,
    ControlCall,
    MessageError,
    Outputs,
    RequestFailed,
    decode,
    encode,
)
from rollout.outputs import NewTokens, RequestDelta, SampleDelta
from rollout.presets import resolve_model
from rollout.stream import OutputAccumulator


@pytest.fixture(scope="module")
def engine():
    return EngineCore("tiny", device="cpu", cache_config=CacheConfig(num_blocks=128))


@pytest.fixture
def plane(engine):
    plane = ControlPlane(engine)
    yield plane
    engine.abort(engine.request_ids)
    assert engine.stats().num_free_blocks == engine.stats().num_blocks
    engine.check_invariants()


def test_messages_round_trip():
    params = SamplingParams(temperature=0.5, stop=["x"], stop_token_ids=[3], seed=2**63).to_dict()
    delta = RequestDelta(
        "r",
        [SampleDelta(1, [5, 6], [-0.5, -1.5], [{5: -0.5, 9: -2.0}, {6: -1.5}], [0, 1], "stop", 6, "t", 8, 1)],
        True,
        [1, 2],
        [None, -3.5],
        [None, {2: -3.5}],
    )
    for msg in (
        AddRequest("a", [1, 2, 3], None, params),
        AddRequest("b", None, "hello", params),
        AbortRequests(["a", "b"]),
        ControlCall(7, "pause", {"mode": "keep"}),
        ControlAck(7, False, None, "ValueError: bad"),
        Outputs([delta]),
        Outputs([], NewTokens(["a", "b", "b"], [0, 0, 1], [5, 6, 7], [-0.25, -1.0, 0.0], [3, 3, 4])),
    ):
        assert decode(encode(msg)) == msg
    assert SamplingParams.from_dict(decode(encode(AddRequest("a", [1], None, params))).params).seed == 2**63


MALFORMED = [
    (b"\xc1\xff not msgpack", "not msgpack"),
    (pickle.dumps(AbortRequests(["a"])), "not"),
    (msgpack.packb({"tag": 1}), "not a message"),
    (msgpack.packb([999, "x"]), "not a message"),
    (msgpack.packb([True, ["a"]]), "not a message"),
    (msgpack.packb([1, "id", [1, 2]]), "needs 4 fields"),
    (msgpack.packb([1, 5, [1], None, {}]), "AddRequest.request_id"),
    (msgpack.packb([1, "id", [1, "2"], None, {}]), "AddRequest.prompt_token_ids"),
    (msgpack.packb([1, "id", [1, True], None, {}]), "AddRequest.prompt_token_ids"),
    (msgpack.packb([1, "id", [1], None, {1: 2}]), "AddRequest.params"),
    (msgpack.packb([2, "a"]), "AbortRequests.request_ids"),
    (msgpack.packb([3, 1, "format_disk", {}]), "unknown control method"),
    (msgpack.packb([3, "1", "get_state", {}]), "ControlCall.call_id"),
]


@pytest.mark.parametrize(("frame", "match"), MALFORMED)
def test_malformed_frames_raise_message_error(frame, match):
    with pytest.raises(MessageError, match=match):
        decode(frame)


def collect(plane: ControlPlane, accs: dict[str, OutputAccumulator], counts: dict | None = None) -> list:
    """Apply the outbox's deltas and token columns to accumulators; return the other messages.
    ``counts`` (when given) tallies how many sample tokens came as full deltas and as columns."""
    others = []
    for msg in plane.outbox:
        if isinstance(msg, Outputs):
            for d in msg.deltas:
                accs[d.request_id].apply(d)
                if counts is not None:
                    counts["delta"] = counts.get("delta", 0) + sum(len(s.token_ids) for s in d.samples)
            for rid, i, token, lp, version in msg.tokens.rows():
                accs[rid].add_token(i, token, lp, version)
            if counts is not None:
                counts["column"] = counts.get("column", 0) + len(msg.tokens)
        else:
            others.append(msg)
    plane.outbox.clear()
    return others


def add(plane, accs, rid, prompt, params):
    ids = None if isinstance(prompt, str) else prompt
    accs[rid] = OutputAccumulator(rid, ids, prompt if ids is None else None, params.n, bool(params.logprobs))
    plane.handle(AddRequest(rid, ids, None if ids is not None else prompt, params.to_dict()))


def run(plane, accs, max_steps=1000, counts=None):
    others = collect(plane, accs, counts)
    for _ in range(max_steps):
        if not plane.can_step:
            break
        plane.step()
        others += collect(plane, accs, counts)
    return others


def assert_same(stream_out, ref):
    assert stream_out.request_id == ref.request_id and stream_out.finished == ref.finished
    assert stream_out.prompt_token_ids == ref.prompt_token_ids
    assert stream_out.num_cached_tokens == ref.num_cached_tokens
    if ref.prompt_logprobs is not None:
        assert stream_out.prompt_logprobs[0] is None
        torch.testing.assert_close(stream_out.prompt_logprobs[1:], ref.prompt_logprobs[1:], atol=1e-4, rtol=0)
    for a, b in zip(stream_out.outputs, ref.outputs, strict=True):
        assert (a.index, a.token_ids, a.weight_versions) == (b.index, b.token_ids, b.weight_versions)
        assert (a.finish_reason, a.stop_reason, a.text) == (b.finish_reason, b.stop_reason, b.text)
        torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-4, rtol=0)
        assert (a.top_logprobs is None) == (b.top_logprobs is None)
        if a.top_logprobs is not None:
            assert [list(t) for t in a.top_logprobs] == [list(t) for t in b.top_logprobs]


def test_streamed_deltas_add_up_to_the_engine_outputs(plane, engine):
    cases = [
        ("ids", [1, 2, 3, 4, 5], SamplingParams(max_tokens=9, seed=1, ignore_eos=True)),
        ("n3", [7] * 20, SamplingParams(max_tokens=6, n=3, seed=5, ignore_eos=True, logprobs=2)),
        ("plp", [9, 8, 7, 6], SamplingParams(max_tokens=4, temperature=0, prompt_logprobs=1)),
        ("text", "The cat sat", SamplingParams(max_tokens=12, temperature=0, stop=["a"])),
        ("plain", [3, 1, 4, 1, 5], SamplingParams(max_tokens=10, n=2, seed=7, ignore_eos=True)),
        ("eos", [2, 7, 1, 8], SamplingParams(max_tokens=12, n=2, seed=9, min_tokens=2)),
    ]
    ref = {}
    engine.blocks.reset_prefix_cache()  # both runs start from an empty prefix cache
    for rid, prompt, params in cases:
        engine.add_request(rid, prompt, params)
    while engine.has_unfinished():
        for out in engine.step():
            ref[out.request_id] = out
    engine.blocks.reset_prefix_cache()
    accs: dict[str, OutputAccumulator] = {}
    for rid, prompt, params in cases:
        add(plane, accs, rid, prompt, params)
    counts: dict[str, int] = {}
    assert run(plane, accs, counts=counts) == []
    for rid, *_ in cases:
        assert accs[rid].finished
        assert_same(accs[rid].cumulative(), ref[rid])
    assert counts["column"] > counts["delta"] > 0  # most tokens went the cheap way, some could not


def test_token_columns_keep_preemption_counts():
    """Samples preempted while decoding report their new counts in a full delta, so the columnar
    stream equals the all-deltas stream (``step_deltas``) after every step, counts included."""
    prompts = [[(7 * i + j) % 50 + 3 for j in range(20)] for i in range(5)]
    params = SamplingParams(max_tokens=80, seed=11, ignore_eos=True)

    def make() -> EngineCore:
        return EngineCore("tiny", device="cpu", cache_config=CacheConfig(num_blocks=24))

    ref_engine, engine = make(), make()
    plane = ControlPlane(engine)
    ref: dict[str, OutputAccumulator] = {}
    accs: dict[str, OutputAccumulator] = {}
    for i, p in enumerate(prompts):
        ref_engine.add_request(f"p{i}", p, params)
        ref[f"p{i}"] = OutputAccumulator(f"p{i}", p, None, 1, False)
        add(plane, accs, f"p{i}", p, params)
    preempted_mid_decode = False
    while ref_engine.has_unfinished():  # both engines run the same steps
        for d in ref_engine.step_deltas():
            had_tokens = bool(ref[d.request_id].samples[0].token_ids)
            preempted_mid_decode |= had_tokens and d.samples[0].num_preemptions > 0
            ref[d.request_id].apply(d)
        plane.step()
        assert collect(plane, accs) == []
        for rid, acc in ref.items():
            got, want = accs[rid].cumulative(), acc.cumulative()
            assert_same(got, want)
            assert [(c.num_preemptions, c.num_cached_tokens) for c in got.outputs] == [
                (c.num_preemptions, c.num_cached_tokens) for c in want.outputs
            ]
    assert preempted_mid_decode and not plane.can_step
    assert engine.stats().num_free_blocks == engine.stats().num_blocks


def test_delta_outputs_hold_only_new_tokens(plane):
    accs: dict[str, OutputAccumulator] = {}
    add(plane, accs, "d", [1, 2, 3], SamplingParams(max_tokens=5, n=2, seed=3, ignore_eos=True))
    seen = [[], []]
    while plane.can_step:
        plane.step()
        collect(plane, accs)
        out = accs["d"].take("delta")
        for c in out.outputs:
            assert len(c.token_ids) == 1 == len(c.logprobs)
            seen[c.index] += c.token_ids
        assert accs["d"].take("delta") is None  # nothing new until the next delta arrives
    final = accs["d"].cumulative()
    assert [c.token_ids for c in final.outputs] == seen and final.finished


def test_bad_requests_fail_alone(plane):
    accs: dict[str, OutputAccumulator] = {}
    plane.handle(AddRequest("bad", [1, 10**6], None, {}))
    plane.handle(AddRequest("bad2", [1], None, {"temperature": -1.0}))
    plane.handle(AddRequest("bad3", None, None, {}))
    add(plane, accs, "ok", [1], SamplingParams(max_tokens=2))
    add(plane, accs, "ok", [1], SamplingParams(max_tokens=2))
    failed = [m for m in plane.outbox if isinstance(m, RequestFailed)]
    assert [(m.request_id, m.error_type) for m in failed] == [
        ("bad", "ValueError"),
        ("bad2", "ValueError"),
        ("bad3", "ValueError"),
        ("ok", "ValueError"),
    ]
    assert "vocabulary" in failed[0].message and "temperature" in failed[1].message
    assert "already in use" in failed[3].message
    plane.outbox.clear()
    run(plane, accs)
    assert accs["ok"].finished


def call(plane, method, call_id=1, **args):
    plane.handle(ControlCall(call_id, method, args))
    acks = [m for m in plane.outbox if isinstance(m, ControlAck)]
    return acks


def test_pause_keep_freezes_and_resume_continues(plane, engine):
    accs: dict[str, OutputAccumulator] = {}
    add(plane, accs, "k", [1, 2], SamplingParams(max_tokens=8, seed=9, ignore_eos=True))
    plane.step()
    plane.step()
    collect(plane, accs)
    for cid in (1, 2):  # idempotent
        (ack,) = call(plane, "pause", cid, mode="keep")
        assert ack == ControlAck(cid, True, "paused", None)
        plane.outbox.clear()
    assert not plane.can_step and engine.stats().num_free_blocks < engine.stats().num_blocks
    add(plane, accs, "held", [3], SamplingParams(max_tokens=2))
    state = call(plane, "get_state")[0].result
    assert state["state"] == "paused" and state["num_held"] == 1 and state["num_requests"] == 1
    plane.outbox.clear()
    assert call(plane, "resume")[0].result == "running"
    plane.outbox.clear()
    assert call(plane, "resume")[0].result == "running"
    run(plane, accs)
    assert accs["k"].finished and len(accs["k"].cumulative().outputs[0].token_ids) == 8
    assert accs["held"].finished
    assert accs["k"].cumulative().outputs[0].num_preemptions == 0


def test_pause_wait_answers_once_drained(plane):
    accs: dict[str, OutputAccumulator] = {}
    add(plane, accs, "w", [1, 2], SamplingParams(max_tokens=4, ignore_eos=True))
    assert call(plane, "pause", 1, mode="wait") == []  # deferred
    assert call(plane, "pause", 2, mode="wait") == []
    assert plane.state is EngineState.DRAINING
    add(plane, accs, "late", [5], SamplingParams(max_tokens=2))
    others = run(plane, accs)
    assert others == [ControlAck(1, True, "paused", None), ControlAck(2, True, "paused", None)]
    assert accs["w"].finished and not accs["late"].finished
    assert call(plane, "pause", 3, mode="wait") == [ControlAck(3, True, "paused", None)]
    plane.outbox.clear()
    call(plane, "resume")
    plane.outbox.clear()
    run(plane, accs)
    assert accs["late"].finished


def test_resume_during_drain_fails_the_wait(plane):
    accs: dict[str, OutputAccumulator] = {}
    add(plane, accs, "w", [1, 2], SamplingParams(max_tokens=4, ignore_eos=True))
    call(plane, "pause", 1, mode="wait")
    acks = call(plane, "resume", 2)
    assert not acks[0].ok and "before the drain" in acks[0].error and acks[1].ok
    plane.outbox.clear()
    run(plane, accs)


def test_pause_abort_returns_partial_outputs(plane, engine):
    accs: dict[str, OutputAccumulator] = {}
    add(plane, accs, "a", [1, 2], SamplingParams(max_tokens=50, ignore_eos=True, n=2))
    plane.step()
    plane.step()
    collect(plane, accs)
    call(plane, "pause", 1, mode="keep")
    add(plane, accs, "h", [4], SamplingParams(max_tokens=3, n=2))
    acks = [m for m in run(plane, accs) if isinstance(m, ControlAck)]
    assert acks[0].result == "paused"
    call(plane, "pause", 2, mode="abort")
    collect(plane, accs)
    a, h = accs["a"].cumulative(), accs["h"].cumulative()
    assert a.finished and h.finished
    assert [len(c.token_ids) for c in a.outputs] == [2, 1]  # the sibling waited for the shared prefill
    assert [len(c.logprobs) for c in a.outputs] == [2, 1]
    assert {c.finish_reason for c in a.outputs + h.outputs} == {"abort"}
    assert engine.stats().num_free_blocks == engine.stats().num_blocks
    assert call(plane, "get_state", 3)[-1].result["state"] == "paused"
    plane.outbox.clear()
    call(plane, "resume")


def test_control_errors_are_acknowledged(plane):
    (ack,) = call(plane, "pause", 1, mode="sideways")
    assert not ack.ok and ack.error.startswith("ValueError") and "sideways" in ack.error
    plane.outbox.clear()
    (ack,) = call(plane, "get_state", 2, verbose=True)
    assert not ack.ok and ack.error.startswith("TypeError")
    plane.outbox.clear()
    assert call(plane, "reset_prefix_cache", 3)[0].result is True
    plane.outbox.clear()
    assert call(plane, "abort_all", 4)[0].result == 0
    assert plane.state is EngineState.RUNNING


# ---- exclusive calls inside a drain, and held requests' ids (control-plane audit, stop 26) -------
_GREEDY4 = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True).to_dict()


def drive(plane: ControlPlane) -> tuple[dict[int, ControlAck], list[str]]:
    for _ in range(50):
        if not plane.can_step:
            break
        plane.step()
    acks = {m.call_id: m for m in plane.outbox if isinstance(m, ControlAck)}
    done = [d.request_id for m in plane.outbox if isinstance(m, Outputs) for d in m.deltas if d.finished]
    plane.outbox.clear()
    return acks, done


@pytest.mark.parametrize("mode", ["keep", "abort"])
def test_update_during_a_deferred_sleep_keeps_the_drain(plane, engine, mode):
    plane.handle(AddRequest("a", [1, 2, 3], None, _GREEDY4))
    plane.handle(ControlCall(1, "sleep", {"level": 1, "pause": "wait"}))  # deferred: drains first
    plane.handle(AddRequest("b", [4, 5, 6], None, _GREEDY4))  # held
    plane.handle(
        ControlCall(2, "update_weights_from_disk", {"path": resolve_model("tiny")[0], "pause": mode})
    )
    acks, done1 = drive(plane)
    assert acks[2].ok, acks[2]  # it was applied: it must not be reported as failed
    assert acks[1].ok and engine.memory.level == 1  # the deferred sleep ran once the drain ended
    plane.handle(ControlCall(3, "wake_up", {}))
    acks, done = drive(plane)
    assert acks[3].ok and plane.state is EngineState.RUNNING
    # the request held during the drain is answered: aborted by pause "abort", else served after the wake
    assert ("b" in done1) == (mode == "abort") and "b" in done1 + done and not plane._held


def test_update_during_a_pause_wait_drain_still_answers_the_pause(plane):
    plane.handle(AddRequest("a", [1, 2, 3], None, _GREEDY4))
    plane.handle(ControlCall(1, "pause", {"mode": "wait"}))
    plane.handle(
        ControlCall(2, "update_weights_from_disk", {"path": resolve_model("tiny")[0], "pause": "keep"})
    )
    acks, done = drive(plane)
    assert "a" in done and acks[2].ok
    assert acks.get(1) == ControlAck(1, True, "paused", None) and plane.state is EngineState.PAUSED


def test_pause_wait_then_sleep_wait_answers_the_pause_and_wakes_paused(plane):
    plane.handle(AddRequest("a", [1, 2, 3], None, _GREEDY4))
    plane.handle(ControlCall(1, "pause", {"mode": "wait"}))
    plane.handle(ControlCall(2, "sleep", {"level": 1, "pause": "wait"}))
    acks, done = drive(plane)
    assert "a" in done and acks[2].ok
    assert acks.get(1) == ControlAck(1, True, "paused", None)
    plane.handle(ControlCall(3, "wake_up", {}))
    acks, _ = drive(plane)
    assert acks[3].ok and plane.state is EngineState.PAUSED  # the pause the caller asked for holds


def test_held_requests_are_refused_on_arrival_for_sample_id_clashes(plane):
    # while paused, requests are held: refused at once for the clashes add_request refuses (they
    # failed at resume() instead)
    one = SamplingParams(max_tokens=2, ignore_eos=True).to_dict()
    two = SamplingParams(max_tokens=2, n=2, ignore_eos=True).to_dict()
    plane.handle(AddRequest("x#1", [1, 2], None, one))
    plane.handle(ControlCall(1, "pause", {"mode": "keep"}))
    plane.outbox.clear()
    plane.handle(AddRequest("x", [1, 2], None, two))  # clashes with the live sample x#1
    plane.handle(AddRequest("y", [1, 2], None, two))
    plane.handle(AddRequest("y#0", [1, 2], None, one))  # clashes with the held y's sample y#0
    failed = [m.request_id for m in plane.outbox if isinstance(m, RequestFailed)]
    assert failed == ["x", "y#0"] and list(plane._held) == ["y"]
