"""The engine core process under failure (audit of stop 26, real processes and sockets): an engine
collected in a reference cycle shuts its core down instead of hanging the interpreter; a deeply
nested frame is rejected, not fatal; calls after a core failure raise EngineDeadError with its
cause; a malformed control call is always answered."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import msgpack
import pytest

from rollout import LLM, AsyncLLM, CacheConfig, EngineCore, EngineDeadError, SamplingParams
from rollout.messages import MessageError, decode

ENGINE_ARGS = {"device": "cpu", "cache_config": CacheConfig(num_blocks=32)}
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


class BadInvariants(EngineCore):
    def check_invariants(self):
        raise AssertionError("injected invariant violation")


def nested(depth):
    x = 0
    for _ in range(depth):
        x = [x]
    return x


@pytest.mark.parametrize("kind", ["async", "llm"])
def test_engine_collected_in_a_reference_cycle_shuts_down(kind):
    script = textwrap.dedent(
        f"""
        import asyncio, gc, os
        from rollout import AsyncLLM, LLM, CacheConfig, SamplingParams
        kw = dict(device="cpu", cache_config=CacheConfig(num_blocks=16))
        if {kind!r} == "async":
            llm = AsyncLLM("tiny", **kw)
            async def use():
                async for _ in llm.generate([1, 2], SamplingParams(max_tokens=2)):
                    pass
            asyncio.run(use())  # llm -> its reader task -> traceback -> frame -> llm
            client = llm.client
        else:
            class Holder: pass
            llm = Holder(); llm.llm = LLM("tiny", multiprocess=True, **kw); llm.me = llm
            client = llm.llm.client
        pid, socket_dir = client.info.pid, client.socket_dir
        del llm, client
        gc.collect()
        print(pid, os.path.exists(socket_dir), flush=True)
        """
    )
    env = {**os.environ, **ONE_THREAD}
    try:
        out = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60
        )
    except subprocess.TimeoutExpired:
        pytest.fail("collecting the engine hung")
    assert out.returncode == 0, out.stderr[-2000:]
    pid, dir_left = out.stdout.split()
    assert dir_left == "False"
    stat = Path(f"/proc/{pid}/stat")
    assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] in "ZX"  # gone or a zombie


def test_deeply_nested_frame_is_a_message_error():
    with pytest.raises(MessageError, match="not a message"):
        decode(msgpack.packb(nested(1000)))


@pytest.mark.parametrize(
    "frame",
    [msgpack.packb(nested(1000)), msgpack.packb([1, "r", [1, 2], None, {"stop": nested(1000)}])],
    ids=["bare", "in-params"],
)
def test_deeply_nested_frame_does_not_kill_the_core(frame):
    with AsyncLLM("tiny", env=ONE_THREAD, **ENGINE_ARGS) as llm:

        async def main():
            llm.client.input.send(frame)
            outs = [o async for o in llm.generate([1, 2], SamplingParams(max_tokens=3, ignore_eos=True))]
            assert outs[-1].outputs[0].finish_reason == "length"
            return await llm.get_state()

        state = asyncio.run(asyncio.wait_for(main(), 60))
        assert state["num_rejected_messages"] == 1


def test_calls_after_a_core_failure_raise_engine_dead_error():
    llm = LLM(
        "tiny", multiprocess=True, engine_class=f"{__name__}:BadInvariants", env=ONE_THREAD, **ENGINE_ARGS
    )
    try:
        llm.client.start_call("get_state", check_invariants=True)  # the core fails and exits
        time.sleep(0.1)  # the caller does something else; the core is still exiting
        with pytest.raises(EngineDeadError, match="injected invariant violation"):
            llm.stats()
        with pytest.raises(EngineDeadError):
            llm.generate([[1, 2]], SamplingParams(max_tokens=2), use_tqdm=False)
    finally:
        llm.shutdown()


def test_malformed_control_call_with_int_keyed_args_is_answered():
    with AsyncLLM("tiny", env=ONE_THREAD, **ENGINE_ARGS) as llm:

        async def main():
            with pytest.raises(ValueError, match="unknown control method"):
                await asyncio.wait_for(llm.call("get_stat", x={1: 2}), 10)

        asyncio.run(main())


def test_a_forked_child_exiting_leaves_the_parents_engine_alone():
    # a forked child (a data loader worker) that exits normally runs the client's finalizer: it
    # removed the parent's socket directory
    script = textwrap.dedent(
        """
        import os, sys
        from rollout import LLM, CacheConfig, SamplingParams
        llm = LLM("tiny", multiprocess=True, device="cpu", cache_config=CacheConfig(num_blocks=16))
        if os.fork() == 0:
            sys.exit(0)
        os.wait()
        out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
        print(os.path.exists(llm.client.socket_dir), len(out[0].outputs[0].token_ids), flush=True)
        llm.shutdown()
        """
    )
    env = {**os.environ, **ONE_THREAD}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True", "4"]


def test_outputs_sent_before_a_core_failure_are_delivered():
    # the outputs and the failure report read in one batch: the outputs were dropped, so a request
    # that had finished got EngineDeadError too
    from rollout.messages import AddRequest, Outputs

    bad = f"{__name__}:BadInvariants"
    llm = LLM("tiny", multiprocess=True, engine_class=bad, env=ONE_THREAD, **ENGINE_ARGS)
    client = llm.client
    try:
        params = SamplingParams(max_tokens=2, ignore_eos=True).to_dict()
        client.send(AddRequest("done", [1, 2, 3], None, params))
        time.sleep(2.0)  # the request finishes; nothing is read meanwhile
        client.start_call("get_state", check_invariants=True)  # the core fails and exits
        client.proc.wait(30)
        msgs = client.recv(1.0)
        finished = [d.request_id for m in msgs if isinstance(m, Outputs) for d in m.deltas if d.finished]
        assert finished == ["done"] and client.is_dead
        with pytest.raises(EngineDeadError, match="injected invariant violation"):
            client.recv(0.1)
    finally:
        llm.shutdown()
