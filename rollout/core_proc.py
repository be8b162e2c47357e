"""The engine core process: ``python -m rollout.core_proc SPEC_JSON``, started by ``EngineCoreClient``.

It connects a PULL socket (client -> core) and a PUSH socket (core -> client) to the client's
ipc:// endpoints, builds the engine, sends ``Ready``, then loops: take every pending message, run one
step when there is work, send what the step produced. With nothing to do it blocks on the input
socket (waking once a second to check that its parent still lives: an orphaned core exits, freeing
its requests). Malformed frames are logged and dropped. Any other error is sent as ``EngineDead``
(with its traceback) before the process exits with status 1. With ``ROLLOUT_CORE_PROFILE=FILE`` in
its environment the loop runs under cProfile and the stats go to FILE at exit.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
import traceback
from typing import Any

import zmq

from rollout.client import CONFIG_CLASSES
from rollout.control import ControlPlane
from rollout.messages import ControlAck, EngineDead, MessageError, Ready, control_call_id, decode, encode
from rollout.weight_sync.cuda_ipc import device_uuid

log = logging.getLogger("rollout.core")

_PARENT_CHECK_S = 1.0  # how often the loop checks that the client process still lives
_SEND_TIMEOUT_MS = 1000  # a blocked send retries after this, checking the parent in between


def main(argv: list[str]) -> int:
    """Run a core described by the JSON spec in ``argv[0]`` (see ``EngineCoreClient``)."""
    spec = json.loads(argv[0])
    logging.basicConfig(level=logging.INFO, format="[rollout.core %(process)d] %(levelname)s %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the client's to handle; it shuts us down
    parent = spec["parent_pid"]
    ctx = zmq.Context()
    inp = ctx.socket(zmq.PULL)
    out = ctx.socket(zmq.PUSH)
    for sock in (inp, out):
        sock.setsockopt(zmq.LINGER, 1000)
    out.setsockopt(zmq.SNDTIMEO, _SEND_TIMEOUT_MS)
    inp.connect(spec["input_address"])
    out.connect(spec["output_address"])
    try:
        profile_path = os.environ.get("ROLLOUT_CORE_PROFILE")  # a file: cProfile the loop into it
        if not profile_path:
            return _serve(spec, inp, out, parent)
        import cProfile

        prof = cProfile.Profile()
        try:
            return prof.runcall(_serve, spec, inp, out, parent)
        finally:
            prof.dump_stats(profile_path)
    except BaseException:
        tb = traceback.format_exc()
        log.error("engine core failed:\n%s", tb)
        with contextlib.suppress(Exception):
            _send(out, encode(EngineDead(tb)), parent)
        return 1
    finally:
        inp.close(linger=0)
        out.close()  # lingers up to 1 s so the last message (EngineDead, shutdown ack) gets out
        ctx.term()
        # The client removes the socket directory too; this covers a client that died first.
        if not _alive(parent):
            shutil.rmtree(spec["socket_dir"], ignore_errors=True)


def _serve(spec: dict[str, Any], inp: zmq.Socket, out: zmq.Socket, parent: int) -> int:
    engine = _build_engine(spec)
    info = {
        "vocab_size": engine.model_config.vocab_size,
        "max_total_tokens": engine.max_total_tokens,
        "has_tokenizer": engine.detokenizer is not None,
        "num_blocks": engine.blocks.num_blocks,
        "block_size": engine.blocks.block_size,
        "pid": os.getpid(),
        "device": str(engine.device),
        "dtype": str(engine.model_config.dtype).removeprefix("torch."),
        "device_uuid": device_uuid(engine.device) if engine.device.type == "cuda" else None,
    }
    _send(out, encode(Ready(info)), parent)
    plane = ControlPlane(engine)
    next_check = time.monotonic() + _PARENT_CHECK_S
    while not plane.shutdown_requested:
        # Block while idle (until the next liveness check, or the open update's lease runs out);
        # otherwise just take what is already queued.
        lease = plane.lease_left_s()
        wait_s = _PARENT_CHECK_S if lease is None else min(_PARENT_CHECK_S, lease)
        if inp.poll(0 if plane.can_step else math.ceil(wait_s * 1000)):
            _drain_input(inp, plane)
        plane.expire_lease()
        if plane.can_step:
            plane.step()
        for msg in plane.outbox:
            _send(out, encode(msg), parent)
        plane.outbox.clear()
        if time.monotonic() >= next_check:
            if not _alive(parent):
                log.warning("client process %d is gone; exiting", parent)
                return 0
            next_check = time.monotonic() + _PARENT_CHECK_S
    return 0


def _drain_input(inp: zmq.Socket, plane: ControlPlane) -> None:
    while True:
        try:
            frame = inp.recv(zmq.NOBLOCK, copy=True)
        except zmq.Again:
            return
        try:
            msg = decode(frame, check=True)
            plane.handle(msg)
        except (MessageError, RecursionError) as e:  # RecursionError: nested too deep to check or print
            plane.num_rejected_messages += 1
            log.warning("rejected a malformed message (%d bytes): %s", len(frame), e)
            call_id = control_call_id(frame)
            if call_id is not None:  # the caller waits for an answer: refuse it rather than hang it
                plane.outbox.append(ControlAck(call_id, False, None, f"ValueError: {e}"))


def _send(out: zmq.Socket, frame: bytes, parent: int) -> None:
    while True:
        try:
            out.send(frame, copy=False)
            return
        except zmq.Again:
            if not _alive(parent):
                raise RuntimeError("client process is gone") from None


def _alive(pid: int) -> bool:
    return os.getppid() == pid


def _build_engine(spec: dict[str, Any]) -> Any:
    kwargs = dict(spec["engine_kwargs"])
    for key, cls in CONFIG_CLASSES.items():
        if kwargs.get(key) is not None:
            kwargs[key] = cls(**kwargs[key])
    module, _, name = spec["engine_class"].partition(":")
    engine_cls = getattr(importlib.import_module(module), name)
    return engine_cls(spec["model"], **kwargs)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
