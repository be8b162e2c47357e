"""AsyncLLM over a real engine core process: concurrency with aborts, pause/resume while streaming,
validation at the edge, malformed frames on the socket. One core serves the module; after every test
it must hold no request and no block."""

from __future__ import annotations

import asyncio
import os
import random
import time

import msgpack
import pytest
import torch

from rollout import AsyncLLM, CacheConfig, EngineCore, SamplingParams

BLOCKS = 512
# One intra-op thread in the core: on a small CPU machine two processes of spinning OpenMP threads
# slow each other down several times over.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def llm():
    with AsyncLLM("tiny", device="cpu", cache_config=CacheConfig(num_blocks=BLOCKS), env=ONE_THREAD) as llm:
        yield llm
    assert not os.path.exists(llm.client.socket_dir) and llm.client.proc.returncode is not None


@pytest.fixture(scope="module")
def reference():
    """The in-process engine the core's outputs must equal."""
    return EngineCore("tiny", device="cpu", cache_config=CacheConfig(num_blocks=BLOCKS))


@pytest.fixture(autouse=True)
def _no_leaks(request):
    yield
    if "llm" not in request.fixturenames:
        return
    llm = request.getfixturevalue("llm")
    state = run(llm.get_state(check_invariants=True))
    assert state["state"] == "running" and state["num_requests"] == 0 and state["num_held"] == 0
    assert state["stats"]["num_free_blocks"] == state["stats"]["num_blocks"] == BLOCKS
    assert not llm._streams and not llm._calls


def run(coro, timeout: float = 60.0):
    async def bounded():
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


def reference_outputs(engine: EngineCore, requests) -> dict:
    engine.blocks.reset_prefix_cache()
    for rid, prompt, params in requests:
        engine.add_request(rid, prompt, params)
    outs = {}
    while engine.has_unfinished():
        for out in engine.step():
            outs[out.request_id] = out
    return outs


async def consume(llm, rid, prompt, params, kind="cumulative", outs=None):
    last = None
    async for out in llm.generate(prompt, params, request_id=rid, output_kind=kind):
        if outs is not None:
            outs.append(out)
        last = out
    return last


def workload(seed: int, count: int, long: frozenset[str] = frozenset()):
    """``count`` short random requests; those named in ``long`` ask for 300 tokens."""
    rng = random.Random(seed)
    reqs = []
    for i in range(count):
        prompt = [rng.randrange(1, 250) for _ in range(rng.randint(1, 12))]
        greedy = rng.random() < 0.5
        max_tokens = rng.randint(1, 10)
        params = SamplingParams(
            temperature=0.0 if greedy else 1.0,
            seed=None if greedy else rng.randrange(10**6),
            max_tokens=300 if f"req-{i}" in long else max_tokens,
            n=rng.choice([1, 1, 1, 2]),
            logprobs=rng.choice([None, 2]),
            ignore_eos=True,
        )
        reqs.append((f"req-{i}", prompt, params))
    return reqs


def assert_prefix(out, ref, aborted: bool):
    for a, b in zip(out.outputs, ref.outputs, strict=True):
        n = len(a.token_ids)
        if aborted and a.finish_reason == "abort":
            assert a.token_ids == b.token_ids[:n]
        else:
            assert (a.token_ids, a.finish_reason) == (b.token_ids, b.finish_reason)
        assert len(a.logprobs) == n == len(a.weight_versions)
        torch.testing.assert_close(a.logprobs, b.logprobs[:n], atol=1e-4, rtol=0)
        if b.top_logprobs is not None:
            assert [list(t) for t in a.top_logprobs] == [list(t) for t in b.top_logprobs[:n]]


def test_concurrent_requests_with_random_aborts_match_in_process_engine(llm, reference):
    rng = random.Random(1)
    # the doomed requests are long, so they are still streaming when the abort comes, however fast
    # the machine (with 1-10 tokens each they could all be done 50 ms after their submission)
    doomed = frozenset(f"req-{i}" for i in range(200) if rng.random() < 0.2)
    reqs = workload(0, 200, long=doomed)
    ref = reference_outputs(reference, reqs)

    async def main():
        tasks = {}
        for i, (rid, prompt, params) in enumerate(reqs):
            kind = "delta" if i % 3 == 0 else "cumulative"
            deltas = [] if kind == "delta" else None
            tasks[rid] = (asyncio.create_task(consume(llm, rid, prompt, params, kind, deltas)), deltas)
            if i % 25 == 0:
                await asyncio.sleep(0.005)
        await asyncio.sleep(0.05)
        await llm.abort(sorted(doomed))
        results = {}
        for rid, (task, deltas) in tasks.items():
            last = await task
            results[rid] = merge_deltas(deltas) if deltas is not None else last
        return results

    results = run(main())
    assert results.keys() == ref.keys()
    num_aborted = 0
    for rid, out in results.items():
        assert out.finished and out.request_id == rid
        num_aborted += any(c.finish_reason == "abort" for c in out.outputs)
        assert_prefix(out, ref[rid], aborted=rid in doomed)
    assert num_aborted == len(doomed)


def merge_deltas(deltas):
    """Add up delta outputs into one cumulative output."""
    last = deltas[-1]
    merged = {}
    for out in deltas:
        for c in out.outputs:
            if c.index not in merged:
                merged[c.index] = c
                continue
            m = merged[c.index]
            m.token_ids = m.token_ids + c.token_ids
            m.logprobs = m.logprobs + c.logprobs
            m.weight_versions = m.weight_versions + c.weight_versions
            if c.top_logprobs is not None:
                m.top_logprobs = m.top_logprobs + c.top_logprobs
            m.finish_reason = c.finish_reason
    last.outputs = [merged[i] for i in sorted(merged)]
    return last


def test_leaving_the_loop_aborts_the_request_and_frees_its_id(llm):
    params = SamplingParams(max_tokens=1000, ignore_eos=True, seed=3)

    async def main():
        async for out in llm.generate([1, 2, 3], params, request_id="quitter"):
            if len(out.outputs[0].token_ids) >= 3:
                break
        # the id stays taken until the abort went through; then it is free again
        while "quitter" in llm._streams:
            with pytest.raises(ValueError, match="already in use"):
                await consume(llm, "quitter", [1], params)
            await asyncio.sleep(0.01)
        out = await consume(llm, "quitter", [4, 5], params.replace(max_tokens=2))
        assert out.prompt_token_ids == [4, 5] and len(out.outputs[0].token_ids) == 2
        assert out.outputs[0].finish_reason == "length"

    run(main())


def test_validation_raises_before_sending(llm):
    async def main():
        bad = [
            ([1, 10**6], SamplingParams(), "vocabulary"),
            ([], SamplingParams(), "empty"),
            ([1, 2.5], SamplingParams(), "not an int"),
            ([1] * 5000, SamplingParams(), "5000 tokens"),
            ([1], SamplingParams(stop_token_ids=[999]), "stop_token_ids"),
        ]
        for prompt, params, match in bad:
            with pytest.raises(ValueError, match=match):
                await consume(llm, "v", prompt, params)
        with pytest.raises(ValueError, match="output_kind"):
            await consume(llm, "v", [1], SamplingParams(), kind="both")
        with pytest.raises(ValueError, match="request_id"):
            await consume(llm, "\ud800", [1], SamplingParams())
        # a text prompt msgpack cannot encode: refused at the send, no stream kept (_no_leaks)
        with pytest.raises(ValueError, match="surrogate"):
            await consume(llm, "v", "Hi \ud800", SamplingParams())
        with pytest.raises(TypeError, match="SamplingParams"):
            await consume(llm, "v", [1], {"max_tokens": 3})
        # a text prompt is checked by the core: its error comes back to the caller
        with pytest.raises(ValueError, match="tokens"):
            await consume(llm, "v", "x" * 5000, SamplingParams())
        out = await consume(llm, "t", "Hello", SamplingParams(max_tokens=3, ignore_eos=True))
        assert out.prompt == "Hello" and out.prompt_token_ids and out.outputs[0].text is not None
        state = await llm.get_state()
        assert state["stats"]["num_prompt_tokens"] == prompt_tokens_before + len(out.prompt_token_ids)
        with pytest.raises(ValueError, match="pause mode"):
            await llm.pause(mode="sideways")

    prompt_tokens_before = run(llm.get_state())["stats"]["num_prompt_tokens"]
    run(main())


def test_duplicate_request_id_is_refused(llm):
    async def main():
        # The duplicate comes once the first request has produced a token, with hundreds more to
        # go: a fixed sleep let the tiny model finish all of them first on a fast machine.
        params = SamplingParams(max_tokens=300, ignore_eos=True)
        first = llm.generate([1, 2], params, request_id="dup")
        assert len((await anext(first)).outputs[0].token_ids) < 300
        with pytest.raises(ValueError, match="already in use"):
            await consume(llm, "dup", [1, 2], params)
        last = [out async for out in first][-1]
        assert len(last.outputs[0].token_ids) == 300 and last.finished

    run(main())


async def start_streams(llm, count, max_tokens, min_tokens_seen=1):
    """Start streaming requests and wait until each has produced a token."""
    seen = {f"s{i}": [] for i in range(count)}
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, seed=11)
    tasks = {
        rid: asyncio.create_task(consume(llm, rid, [3, 4, 5 + i], params, "delta", seen[rid]))
        for i, rid in enumerate(seen)
    }
    while min(count_tokens(seen).values()) < min_tokens_seen:
        await asyncio.sleep(0.01)
    return tasks, seen


def count_tokens(seen):
    return {rid: sum(len(o.outputs[0].token_ids) for o in outs) for rid, outs in seen.items()}


def test_pause_keep_then_resume_continues_streams(llm):
    async def main():
        # 200 tokens each: the streams are still running when the pause lands, on any machine
        tasks, seen = await start_streams(llm, 8, max_tokens=200)
        assert await llm.pause("keep") == "paused"
        assert await llm.pause("keep") == "paused"  # idempotent
        frozen = count_tokens(seen)
        late = asyncio.create_task(consume(llm, "late", [7, 7], SamplingParams(max_tokens=3)))
        await asyncio.sleep(0.3)
        state = await llm.get_state()
        assert state["state"] == "paused" and state["num_requests"] == 8 and state["num_held"] == 1
        assert state["stats"]["num_free_blocks"] < BLOCKS  # the frozen requests keep their KV
        assert count_tokens(seen) == frozen and not late.done()
        assert await llm.resume() == "running"
        outs = [await t for t in tasks.values()]
        assert (await late).finished
        assert all(o.outputs[0].finish_reason == "length" for o in outs)
        assert all(n == 200 for n in count_tokens(seen).values())

    run(main())


def test_pause_wait_returns_after_in_flight_requests_finish(llm):
    async def main():
        tasks, seen = await start_streams(llm, 8, max_tokens=25)
        assert await llm.pause("wait") == "paused"
        assert all(t.done() for t in tasks.values())
        assert all(n == 25 for n in count_tokens(seen).values())
        late = asyncio.create_task(consume(llm, "late", [7, 7], SamplingParams(max_tokens=3)))
        await asyncio.sleep(0.2)
        assert not late.done() and (await llm.get_state())["num_held"] == 1
        await llm.resume()
        assert len((await late).outputs[0].token_ids) <= 3

    run(main())


def test_pause_abort_ends_streams_with_partial_outputs(llm):
    async def main():
        tasks, seen = await start_streams(llm, 8, max_tokens=500, min_tokens_seen=2)
        assert await llm.pause("abort") == "paused"
        for task in tasks.values():
            out = await task
            assert out.finished and out.outputs[0].finish_reason == "abort"
        counts = count_tokens(seen)
        assert all(2 <= n < 500 for n in counts.values())
        state = await llm.get_state()
        assert state["state"] == "paused" and state["stats"]["num_free_blocks"] == BLOCKS
        late = asyncio.create_task(consume(llm, "late", [7, 7], SamplingParams(max_tokens=3)))
        await asyncio.sleep(0.1)
        assert not late.done()
        await llm.resume()
        assert (await late).finished

    run(main())


def test_malformed_frames_are_rejected_and_the_engine_keeps_serving(llm):
    frames = [
        b"\x00garbage",
        msgpack.packb({"not": "a message"}),
        msgpack.packb([1, "x"]),
        msgpack.packb([1, "x", ["1"], None, {}]),
        msgpack.packb([3, 1, "rm -rf", {}]),
        msgpack.packb([11, []]),  # an output message sent to the core
    ]
    before = run(llm.get_state())["num_rejected_messages"]
    for frame in frames:
        llm.client.input.send(frame)
    # a well-formed request with bad params fails alone (nobody listens for it here)
    llm.client.input.send(msgpack.packb([1, "orphan", [1], None, {"top_p": 7}]))

    async def main():
        out = await consume(llm, "after", [1, 2], SamplingParams(max_tokens=4, ignore_eos=True))
        assert len(out.outputs[0].token_ids) == 4
        return await llm.get_state()

    state = run(main())
    assert state["num_rejected_messages"] == before + len(frames)


def test_control_calls_from_many_tasks(llm):
    async def main():
        calls = [llm.get_state() for _ in range(20)] + [llm.reset_prefix_cache() for _ in range(5)]
        results = await asyncio.gather(*calls)
        assert all(r["state"] == "running" for r in results[:20]) and all(results[20:])
        assert await llm.abort_all() == 0

    run(main())


def test_idle_core_blocks_instead_of_spinning(llm):
    def cpu_seconds(pid):
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    before = cpu_seconds(llm.info.pid)
    time.sleep(1.0)
    assert cpu_seconds(llm.info.pid) - before < 0.2


def test_aclose_keeps_the_event_loop_serving_while_the_core_exits():
    """``async with`` / ``aclose`` stop the core in a worker thread: with the core frozen (SIGSTOP)
    the loop goes on ticking while the shutdown waits for it, open streams fail at once, and the
    core and its sockets are gone after."""
    import signal

    from rollout.client import EngineDeadError

    async def main() -> tuple[list[float], float, BaseException | None]:
        llm = AsyncLLM("tiny", device="cpu", cache_config=CacheConfig(num_blocks=64), env=ONE_THREAD)
        params = SamplingParams(max_tokens=10_000, temperature=0, ignore_eos=True)

        async def consume() -> BaseException | None:
            try:
                async for _ in llm.generate([5, 6, 7], params, request_id="long"):
                    pass
            except EngineDeadError as e:
                return e
            return None

        stream = asyncio.create_task(consume())
        await asyncio.sleep(0.5)  # streaming
        ticks: list[float] = []

        async def tick() -> None:
            while True:
                ticks.append(time.monotonic())
                await asyncio.sleep(0.01)

        ticker = asyncio.create_task(tick())
        os.kill(llm.client.proc.pid, signal.SIGSTOP)  # the polite shutdown now waits for the core
        loop = asyncio.get_running_loop()
        loop.call_later(1.0, os.kill, llm.client.proc.pid, signal.SIGCONT)
        t0 = time.monotonic()
        await llm.aclose()
        took = time.monotonic() - t0
        ticker.cancel()
        assert not os.path.exists(llm.client.socket_dir) and llm.client.proc.returncode is not None
        return ticks, took, await stream

    ticks, took, err = run(main())
    assert took >= 0.9  # it did wait for the frozen core
    # the loop went on ticking all through the frozen second (blocked, it ticked once, after it)
    assert len(ticks) >= 10 and ticks[-1] - ticks[0] >= 0.8
    assert isinstance(err, Exception) and "shut down" in str(err)


@pytest.mark.parametrize("delay", [None, 0.0, 0.02])
def test_requests_made_while_aclose_runs_fail_at_once(delay):
    """A generate() or call() from another task while aclose() awaits (right behind it, while it
    waits for the cancelled reader, while the worker thread stops the core) raises EngineDeadError
    instead of registering a stream that no reader answers (it hung) or starting a reader on
    sockets another thread is closing."""
    from rollout.client import EngineDeadError

    async def main() -> list[str]:
        llm = AsyncLLM("tiny", device="cpu", cache_config=CacheConfig(num_blocks=64), env=ONE_THREAD)
        async for _ in llm.generate([5, 6, 7], SamplingParams(max_tokens=2, temperature=0)):
            pass  # the reader runs
        closing = asyncio.create_task(llm.aclose())
        if delay is not None:
            await asyncio.sleep(delay)

        async def late() -> None:
            async for _ in llm.generate([5, 6, 7], SamplingParams(max_tokens=50), request_id="late"):
                pass

        errors = []
        for coro in (late(), llm.get_state()):
            try:
                await asyncio.wait_for(coro, 20)
                errors.append("no error")
            except EngineDeadError:
                errors.append("dead")
        await closing
        return errors

    assert run(main()) == ["dead", "dead"]
