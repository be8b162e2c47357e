"""Real `rollout serve` processes on 127.0.0.1 for the server tests.

Two servers start once per session, side by side (each one a server process plus its engine core):
``secured`` has an API key and the admin routes on (with their own key); ``open_server`` has
neither. After every test that used ``secured``, the engine must hold no request and every KV block
must be free (checked through /admin/state with the core's invariant check).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("httpx")

import httpx  # noqa: E402

API_KEY = "test-api-key"
ADMIN_KEY = "test-admin-key"
BLOCKS = 512
START_TIMEOUT = 120.0


@dataclass
class Server:
    proc: subprocess.Popen
    log: Path
    url: str = ""
    api_key: str | None = None
    admin_key: str | None = None

    def headers(self, key: str | None = "api") -> dict[str, str]:
        k = self.api_key if key == "api" else self.admin_key if key == "admin" else key
        return {"Authorization": f"Bearer {k}"} if k else {}

    def client(self, **kw: object) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers(), timeout=60.0, **kw)  # type: ignore[arg-type]

    def state(self, check_invariants: bool = True) -> dict:
        r = httpx.get(
            f"{self.url}/admin/state",
            params={"check_invariants": check_invariants},
            headers=self.headers("admin"),
            timeout=30.0,
        )
        r.raise_for_status()
        return r.json()


def _start(log: Path, *flags: str, env: dict[str, str] | None = None) -> Server:
    cmd = [sys.executable, "-m", "rollout.cli", "serve", "tiny", "--port", "0", "--device", "cpu"]
    cmd += ["--num-blocks", str(BLOCKS), "--max-num-seqs", "64", *flags]
    # One intra-op thread per process: the test machine has 2 cores shared by 4 processes.
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    out = open(log, "w")  # noqa: SIM115 (the process writes it; closed when the process is stopped)
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=full_env)
    return Server(proc, log)


def _wait(server: Server) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        text = server.log.read_text()
        for line in text.splitlines():
            if line.startswith("rollout serve: listening on "):
                server.url = line.rsplit(" ", 1)[1]
        if server.url:
            try:
                if httpx.get(f"{server.url}/health", timeout=5.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
        if server.proc.poll() is not None:
            raise RuntimeError(f"the server exited with {server.proc.returncode}:\n{text[-4000:]}")
        time.sleep(0.2)
    raise TimeoutError(f"the server did not start in {START_TIMEOUT} s:\n{server.log.read_text()[-4000:]}")


def _stop(server: Server) -> None:
    if server.proc.poll() is None:
        server.proc.terminate()
        try:
            server.proc.wait(20)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory, _preset_cache: None) -> dict[str, Server]:
    from rollout.presets import resolve_model

    resolve_model("tiny")  # build the preset once, before two servers race to
    d = tmp_path_factory.mktemp("servers")
    secured = _start(
        d / "secured.log", "--enable-admin", env={"ROLLOUT_API_KEY": API_KEY, "ROLLOUT_ADMIN_KEY": ADMIN_KEY}
    )
    secured.api_key, secured.admin_key = API_KEY, ADMIN_KEY
    open_server = _start(d / "open.log")
    started = {"secured": secured, "open": open_server}
    try:
        for s in started.values():
            _wait(s)
        yield started
    finally:
        for s in started.values():
            _stop(s)
        # uvicorn re-raises the SIGTERM it handled once it has shut down cleanly
        assert secured.proc.returncode in (0, -15), secured.log.read_text()[-4000:]
        for s in started.values():
            assert "Traceback" not in s.log.read_text(), s.log.read_text()[-6000:]


@pytest.fixture
def secured(servers: dict[str, Server]) -> Server:
    s = servers["secured"]
    yield s
    assert_clean(s)


@pytest.fixture
def open_server(servers: dict[str, Server]) -> Server:
    return servers["open"]


def assert_clean(server: Server, timeout: float = 20.0) -> None:
    """No request left in the engine and every block free (aborts may still be in flight: wait)."""
    deadline = time.monotonic() + timeout
    while True:
        state = server.state()
        stats = state["stats"]
        clean = state["num_requests"] == 0 and state["num_held"] == 0
        clean = clean and stats["num_free_blocks"] == stats["num_blocks"] == BLOCKS
        if clean and state["state"] == "running":
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"the engine is not clean: {state}")
        time.sleep(0.1)
