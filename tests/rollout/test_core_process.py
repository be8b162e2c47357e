"""The engine core process's lifetime: faults reach every caller quickly, shutdown and dying clients
leave no process or socket file behind, two engines run side by side."""

from __future__ import annotations

import asyncio
import glob
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

from rollout import LLM, AsyncLLM, CacheConfig, EngineCore, EngineDeadError, SamplingParams

ENGINE_ARGS = {"device": "cpu", "cache_config": CacheConfig(num_blocks=128)}
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # see test_async_llm.py


class FaultyEngine(EngineCore):
    """Raises in the middle of serving when a request id starts with "explode"."""

    def step_outputs(self):
        if any(rid.startswith("explode") for rid in self.request_ids):
            raise RuntimeError("injected fault in step")
        return super().step_outputs()


class BrokenEngine(EngineCore):
    def __init__(self, model, **kwargs):
        raise ValueError("this engine is broken on purpose")


def run(coro, timeout: float = 60.0):
    async def bounded():
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


def gone(pid: int, within: float = 10.0) -> bool:
    """Whether the process exits within ``within`` seconds (a zombie awaiting its reaper counts)."""
    deadline = time.monotonic() + within
    while True:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    return True
        except FileNotFoundError:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


async def stream(llm, rid, max_tokens=10_000, seed=None):
    last = None
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, seed=seed)
    async for out in llm.generate([1, 2, 3], params, rid):
        last = out
    return last


def socket_dirs() -> set[str]:
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "rollout-engine-*")))


def live_children() -> set[tuple[int, int]]:
    """This process's children that have not exited, as (pid, start time) so that a recycled pid
    reads as a different process."""
    children = set()
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid() and fields[0] not in ("Z", "X"):
            children.add((int(stat.split("/")[2]), int(fields[19])))
    return children


@pytest.fixture(autouse=True)
def _no_leaks():
    """Only what a test itself started counts: session-scoped fixtures of other test directories
    (tests/server's servers) keep their own children alive across this module's tests."""
    sockets, children = socket_dirs(), live_children()
    yield
    assert socket_dirs() <= sockets, "socket directories left behind"
    leaked = sorted(pid for pid, _ in live_children() - children)
    assert leaked == [], "engine processes left behind"


async def until_streaming(llm, count):
    tasks = [asyncio.create_task(stream(llm, f"r{i}")) for i in range(count)]
    while (await llm.get_state())["stats"]["num_output_tokens"] < count:
        await asyncio.sleep(0.02)
    return tasks


def test_killed_core_fails_every_caller_within_seconds():
    llm = AsyncLLM("tiny", env=ONE_THREAD, **ENGINE_ARGS)
    socket_dir, pid = llm.client.socket_dir, llm.info.pid

    async def main():
        tasks = await until_streaming(llm, 16)
        waiter = asyncio.create_task(llm.pause("wait"))  # a control call that waits on the streams
        await asyncio.sleep(0.05)
        os.kill(pid, signal.SIGKILL)
        start = time.monotonic()
        results = await asyncio.gather(*tasks, waiter, return_exceptions=True)
        elapsed = time.monotonic() - start
        assert all(isinstance(r, EngineDeadError) for r in results), results
        assert "SIGKILL" in str(results[0])
        with pytest.raises(EngineDeadError, match="SIGKILL"):
            await stream(llm, "after")
        with pytest.raises(EngineDeadError):
            await llm.get_state()
        return elapsed

    assert run(main()) < 5.0
    assert not llm.is_running
    llm.shutdown()
    assert not os.path.exists(socket_dir)


def test_core_error_reaches_callers_with_its_cause():
    with AsyncLLM("tiny", engine_class=f"{__name__}:FaultyEngine", env=ONE_THREAD, **ENGINE_ARGS) as llm:
        pid = llm.info.pid

        async def main():
            tasks = await until_streaming(llm, 4)
            tasks.append(asyncio.create_task(stream(llm, "explode-now", 5)))
            results = await asyncio.gather(*tasks, return_exceptions=True)
            assert all(isinstance(r, EngineDeadError) for r in results), results
            assert "injected fault in step" in str(results[0])

        run(main(), timeout=30)
        assert gone(pid)
        assert llm.client.proc.wait(10) == 1
    assert not os.path.exists(llm.client.socket_dir)


def test_startup_failure_raises_and_leaves_nothing():
    with pytest.raises(EngineDeadError, match="broken on purpose"):
        AsyncLLM("tiny", engine_class=f"{__name__}:BrokenEngine", **ENGINE_ARGS)
    with pytest.raises(ValueError, match="neither a local directory nor a preset"):
        AsyncLLM("no-such-model", **ENGINE_ARGS)  # checked before any process starts
    with pytest.raises(TypeError, match="cannot be sent"):
        AsyncLLM("tiny", seed=object())


def test_two_engines_side_by_side_and_clean_shutdown():
    params = SamplingParams(max_tokens=12, seed=4, ignore_eos=True)
    a = AsyncLLM("tiny", env=ONE_THREAD, **ENGINE_ARGS)
    b = LLM("tiny", multiprocess=True, env=ONE_THREAD, **ENGINE_ARGS)
    try:
        assert a.client.socket_dir != b.client.socket_dir and a.info.pid != b.client.info.pid

        async def main():
            return await asyncio.gather(*(stream(a, f"a{i}", 12, seed=4) for i in range(3)))

        outs_a = run(main())
        outs_b = b.generate([[1, 2, 3]] * 3, params, use_tqdm=False)
        ref = LLM("tiny", **ENGINE_ARGS).generate([[1, 2, 3]], params, use_tqdm=False)[0].outputs[0]
        for out in outs_a + outs_b:
            assert out.outputs[0].token_ids == ref.token_ids and out.outputs[0].finish_reason == "length"
        text = b.generate("Hello", params.replace(max_tokens=3), use_tqdm=False)[0]
        assert text.prompt == "Hello" and text.prompt_token_ids == b.get_tokenizer()("Hello")["input_ids"]
        assert len(text.outputs[0].token_ids) == 3 and text.outputs[0].text is not None
        with pytest.raises(ValueError, match="vocabulary"):
            b.generate([[1, 2], [1, 10**6]], params, use_tqdm=False)
        assert b.stats().num_free_blocks == 128
    finally:
        a.shutdown()
        b.shutdown()
    for llm_dir, pid in ((a.client.socket_dir, a.info.pid), (b.client.socket_dir, b.client.info.pid)):
        assert not os.path.exists(llm_dir) and gone(pid, 0.1)
    a.shutdown()  # idempotent
    with pytest.raises(EngineDeadError, match="shut down"):
        run(stream(a, "late"))


def test_core_exits_when_its_client_dies_or_exits_without_shutdown():
    script = textwrap.dedent(
        """
        import sys
        from rollout import AsyncLLM, CacheConfig
        llm = AsyncLLM("tiny", device="cpu", cache_config=CacheConfig(num_blocks=16))
        print(llm.info.pid, llm.client.socket_dir, flush=True)
        sys.stdin.readline()  # then exit normally: the finalizer stops the core
        """
    )
    pipe = subprocess.PIPE
    env = {**os.environ, **ONE_THREAD}  # for the clients and their cores
    cmd = [sys.executable, "-c", script]
    procs = [subprocess.Popen(cmd, stdin=pipe, stdout=pipe, text=True, env=env) for _ in range(2)]
    try:
        cores = [p.stdout.readline().split() for p in procs]
        procs[0].kill()  # no chance to clean up: the core notices its parent is gone
        procs[1].stdin.write("exit\n")
        procs[1].stdin.flush()
        assert procs[1].wait(30) == 0
        for core_pid, socket_dir in cores:
            assert gone(int(core_pid), within=10.0)
            assert not os.path.exists(socket_dir)
    finally:
        for p in procs:
            p.kill()
            p.wait()
