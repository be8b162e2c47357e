"""``EngineCoreClient``: starts an engine core process and owns the sockets to it.

The client binds two ipc:// endpoints in a fresh temporary directory (so any number of engines can
run side by side), starts ``python -m rollout.core_proc`` (a fresh interpreter: no fork of the
caller's state, and the caller's ``__main__`` is never re-imported), and waits for ``Ready``.
``shutdown()`` (also run by a finalizer when the client is collected or the interpreter exits) asks
the core to stop, waits for it, terminates it if needed, and removes the socket directory.

This class is synchronous and single-threaded (zmq sockets are not thread-safe); ``AsyncLLM`` reads
the output socket through an asyncio shadow of it, ``LLM(multiprocess=True)`` through ``recv``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
import zmq

from rollout.config import CacheConfig, RunnerConfig, SchedulerConfig
from rollout.messages import ControlAck, ControlCall, EngineDead, Message, Ready, decode, encode
from rollout.presets import resolve_model

CONFIG_CLASSES = MappingProxyType(
    {"cache_config": CacheConfig, "scheduler_config": SchedulerConfig, "runner_config": RunnerConfig}
)
"""Engine keyword arguments that are config dataclasses (sent to the core as dicts)."""


class EngineDeadError(RuntimeError):
    """The engine core process died or failed; the message carries the cause."""


@dataclass(frozen=True)
class EngineInfo:
    """What the core reports at start-up (what clients validate input against)."""

    vocab_size: int
    max_total_tokens: int  # prompt + output tokens one sequence may hold
    has_tokenizer: bool
    num_blocks: int
    block_size: int
    pid: int
    device: str  # the engine's device ("cuda:0", "cpu")
    dtype: str  # its weights' dtype ("bfloat16")
    device_uuid: str | None  # the GPU's UUID (CUDA IPC needs the sender on the same GPU)


class EngineCoreClient:
    """Starts and talks to one engine core process."""

    def __init__(
        self,
        model: str,
        *,
        engine_class: str = "rollout.engine:EngineCore",
        startup_timeout: float = 300.0,
        env: dict[str, str] | None = None,
        **engine_kwargs: Any,
    ) -> None:
        """``engine_kwargs`` are ``EngineCore``'s keyword arguments. ``engine_class`` ("module:Name")
        is the engine built in the core (an ``EngineCore`` subclass; tests inject faults this way).
        ``env`` adds environment variables for the core process (``CUDA_VISIBLE_DEVICES``,
        ``OMP_NUM_THREADS``, ...)."""
        path, load_format = resolve_model(model, engine_kwargs.pop("load_format", "auto"))
        self.model_path = path
        kwargs = _plain_kwargs({**engine_kwargs, "load_format": load_format})
        self.socket_dir = tempfile.mkdtemp(prefix="rollout-engine-")
        if len(self.socket_dir) > 90:  # unix socket paths are limited to ~107 bytes
            os.rmdir(self.socket_dir)
            self.socket_dir = tempfile.mkdtemp(prefix="rollout-engine-", dir="/tmp")
        self._ctx = zmq.Context()
        self.input = self._ctx.socket(zmq.PUSH)
        self.output = self._ctx.socket(zmq.PULL)
        self.input.setsockopt(zmq.SNDHWM, 0)  # never block or drop a request while the core is busy
        self.input.setsockopt(zmq.LINGER, 0)
        self.output.setsockopt(zmq.LINGER, 0)
        self.input.bind(f"ipc://{self.socket_dir}/input")
        self.output.bind(f"ipc://{self.socket_dir}/output")
        spec = {
            "model": path,
            "engine_class": engine_class,
            "engine_kwargs": kwargs,
            "input_address": f"ipc://{self.socket_dir}/input",
            "output_address": f"ipc://{self.socket_dir}/output",
            "socket_dir": self.socket_dir,
            "parent_pid": os.getpid(),
        }
        # The core imports what the caller can import (``engine_class`` may live beside the caller).
        path_dirs = [p for p in sys.path if p and os.path.isdir(p)]
        core_env = {**os.environ, **(env or {})}
        core_env["PYTHONPATH"] = os.pathsep.join([*path_dirs, core_env.get("PYTHONPATH", "")])
        cmd = [sys.executable, "-m", "rollout.core_proc", json.dumps(spec)]
        self.proc = subprocess.Popen(cmd, env=core_env)
        # The finalizer holds both sockets: collected in a reference cycle, the client's weakrefs
        # (the context's socket set among them) are cleared before it runs, and a socket that
        # ctx.destroy cannot see stays open and makes ctx.term() wait forever.
        self._finalizer = weakref.finalize(
            self, _cleanup, self.proc, self._ctx, (self.input, self.output), self.socket_dir, os.getpid()
        )
        self._call_ids = 0
        self._acks: dict[int, ControlAck] = {}  # answers that arrived while waiting for another
        self._dead: EngineDeadError | None = None
        try:
            self.info = self._wait_ready(startup_timeout)
        except BaseException:
            self.shutdown()
            raise

    # ---- sending and receiving --------------------------------------------------------------
    def send(self, msg: Message) -> None:
        """Queue one message to the core (never blocks)."""
        self.check_alive()
        try:
            self.input.send(encode(msg), zmq.NOBLOCK, copy=False)
        except zmq.Again:  # no peer (SNDHWM is 0): the core closed its sockets, it failed and is exiting
            self._fail_disconnected()

    def _fail_disconnected(self) -> None:
        """Raise ``EngineDeadError`` for a core that closed its input socket: with the cause from its
        ``EngineDead`` message when that is still unread, else with how its process ended."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5.0)
        self.recv(0)  # an unread EngineDead frame raises here, with the core's traceback
        self.check_alive()
        self.mark_dead(EngineDeadError(f"engine core process {self.proc.pid} closed its connection"))

    def next_call_id(self) -> int:
        self._call_ids += 1
        return self._call_ids

    def recv(self, timeout_s: float) -> list[Message]:
        """Messages the core sent, waiting up to ``timeout_s`` for the first. Raises
        ``EngineDeadError`` when the core reported a failure or is gone; messages that came before
        a failure report are returned first (outputs of requests that finished before it), and the
        failure raises from the next call (``is_dead`` is already true)."""
        if self._dead is not None:
            raise self._dead
        frames = []
        if self.output.poll(int(timeout_s * 1000)):
            while True:
                try:
                    frames.append(self.output.recv(zmq.NOBLOCK, copy=True))
                except zmq.Again:
                    break
        if not frames:
            self.check_alive()
        msgs: list[Message] = []
        for frame in frames:
            try:
                msgs.append(self.decode(frame))
            except EngineDeadError:
                if msgs:
                    return msgs
                raise
        return msgs

    def decode(self, frame: bytes) -> Message:
        """Decode one output frame; an ``EngineDead`` message marks the client dead and raises."""
        msg = decode(frame, check=False)
        if isinstance(msg, EngineDead):
            self.mark_dead(EngineDeadError(f"engine core failed:\n{msg.error}"))
        return msg

    def call(self, method: str, timeout_s: float = 600.0, **args: Any) -> Any:
        """Run a control call and wait for its answer (synchronous users only: it reads the output
        socket itself, dropping whatever else arrives meanwhile)."""
        return self.wait_call(self.start_call(method, **args), method, timeout_s)

    def start_call(self, method: str, **args: Any) -> int:
        """Send a control call without waiting (a weight sender broadcasts before the answer comes);
        returns its id for ``wait_call``."""
        call_id = self.next_call_id()
        self.send(ControlCall(call_id, method, args))
        return call_id

    def wait_call(self, call_id: int, method: str = "call", timeout_s: float = 600.0) -> Any:
        """Wait for the answer to ``call_id``. Answers to other calls are kept for their own
        ``wait_call``; anything else is dropped (synchronous users only)."""
        deadline = time.monotonic() + timeout_s
        while True:
            ack = self._acks.pop(call_id, None)
            if ack is not None:
                return ack_result(ack)
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{method}() got no answer in {timeout_s} s")
            for msg in self.recv(0.2):
                if isinstance(msg, ControlAck):
                    self._acks[msg.call_id] = msg

    # ---- liveness and shutdown --------------------------------------------------------------
    @property
    def is_dead(self) -> bool:
        return self._dead is not None

    def mark_dead(self, error: EngineDeadError) -> None:
        if self._dead is None:
            self._dead = error
        raise self._dead

    def check_alive(self) -> None:
        """Raise ``EngineDeadError`` (with the cause) if the core failed or its process is gone."""
        if self._dead is not None:
            raise self._dead
        if not self._finalizer.alive:
            raise EngineDeadError("the engine was shut down")
        code = self.proc.poll()
        if code is not None:
            how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
            self.mark_dead(EngineDeadError(f"engine core process {self.proc.pid} {how}"))

    def shutdown(self) -> None:
        """Stop the core and release everything (idempotent)."""
        self._finalizer()

    def _wait_ready(self, timeout_s: float) -> EngineInfo:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for msg in self.recv(0.1):
                if isinstance(msg, Ready):
                    return EngineInfo(**{f.name: msg.info[f.name] for f in dataclasses.fields(EngineInfo)})
        raise TimeoutError(f"the engine core did not start in {timeout_s} s")


def ack_result(ack: ControlAck) -> Any:
    """The result of a control call, or its error raised (ValueError/TypeError as such)."""
    if ack.ok:
        return ack.result
    kind, _, text = (ack.error or "RuntimeError: ").partition(": ")
    raise {"ValueError": ValueError, "TypeError": TypeError}.get(kind, RuntimeError)(text)


def _cleanup(
    proc: subprocess.Popen,
    ctx: zmq.Context,
    sockets: tuple[zmq.Socket, zmq.Socket],
    socket_dir: str,
    owner_pid: int,
) -> None:
    """Stop the core process (politely, then by force) and remove the sockets and their directory.
    Only in the process that started the core: a forked child (a data loader worker) exiting
    normally runs the finalizers too, and removed its parent's socket directory."""
    if os.getpid() != owner_pid:
        return
    input_socket = sockets[0]
    if proc.poll() is None:
        with contextlib.suppress(zmq.ZMQError):
            input_socket.send(encode(ControlCall(0, "shutdown", {})), zmq.NOBLOCK)
        try:
            proc.wait(5.0)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(5.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    for sock in sockets:
        sock.close(linger=0)
    ctx.destroy(linger=0)
    shutil.rmtree(socket_dir, ignore_errors=True)


def _plain_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Engine kwargs as JSON data (config dataclasses as dicts, devices and dtypes as strings)."""
    out: dict[str, Any] = {}
    for key, value in kwargs.items():
        if key in CONFIG_CLASSES and value is not None:
            if not isinstance(value, CONFIG_CLASSES[key]):
                raise TypeError(f"{key} must be {CONFIG_CLASSES[key].__name__}, got {type(value).__name__}")
            value = dataclasses.asdict(value)
        elif isinstance(value, torch.device):
            value = str(value)
        elif isinstance(value, torch.dtype):
            value = str(value).removeprefix("torch.")
        try:
            json.dumps(value)
        except TypeError:
            raise TypeError(f"engine argument {key}={value!r} cannot be sent to the core process") from None
        out[key] = value
    return out
