"""The step-profile bench runs end to end on the CPU (no GPU events there), and its GPU-trace
summary computes busy time as the union of kernel intervals, per step."""

from __future__ import annotations

import gzip
import json
import time

import pytest

import rollout.model_runner as model_runner
from rollout import LLM, SamplingParams
from rollout.benchmarks import step_profile
from rollout.benchmarks.common import busy_us, gpu_trace_summary
from rollout.benchmarks.step_profile import launch_host_ms


def test_busy_time_is_the_union_of_intervals():
    assert busy_us([]) == 0.0
    assert busy_us([(0, 10), (5, 12), (20, 25), (21, 22)]) == pytest.approx(17.0)
    assert busy_us([(20, 25), (0, 10)]) == pytest.approx(15.0)


def test_gpu_trace_summary_per_step():
    trace = {
        "traceEvents": [
            {"ph": "X", "cat": "kernel", "name": "gemm", "ts": 0.0, "dur": 10.0},
            {"ph": "X", "cat": "kernel", "name": "gemm", "ts": 30.0, "dur": 10.0},
            {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD", "ts": 5.0, "dur": 10.0},
            {"ph": "X", "cat": "kernel", "name": "norm", "ts": 50.0, "dur": 2.0},
            {"ph": "X", "cat": "cuda_runtime", "name": "cudaGraphLaunch", "ts": 0.0, "dur": 8.0},
            {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0.0, "dur": 99.0},
            {"ph": "i", "cat": "kernel", "name": "marker", "ts": 1.0},
        ]
    }
    s = gpu_trace_summary(trace, per=2)
    assert s["gpu_busy_us"] == pytest.approx((15 + 10 + 2) / 2)
    assert s["gpu_span_us"] == pytest.approx(52 / 2) and s["gpu_ops"] == 2
    assert s["runtime_calls"] == {"cudaGraphLaunch": 0.5} and s["runtime_us"] == 4.0
    assert s["top_kernels"][0] == {"name": "gemm", "count": 1.0, "us": 10.0}


def test_step_profile_runs_on_cpu(tmp_path):
    eager_sampler = model_runner.sample
    step_profile.main(
        ["--device", "cpu", "--model", "tiny", "--batches", "2", "--context", "16", "--steps", "2",
         "--out", str(tmp_path)]
    )  # fmt: skip
    rows = json.loads((tmp_path / "step_profile.json").read_text())
    assert [r["batch"] for r in rows] == [2] and rows[0]["wall_ms_per_step"] > 0
    assert rows[0]["gpu_ops"] == 0  # the CPU has no GPU events
    host = rows[0]["host_ms"]  # every phase ran each step, and they fit in the step's wall time
    outer = ("schedule", "launch", "collect", "process")
    inner = ("sampling_rows", "prepare", "sampling_tensors", "sample")  # inside launch (no graphs here)
    assert set(host) == {*outer, *inner} and min(host.values()) > 0
    assert sum(host[k] for k in outer) < rows[0]["wall_ms_per_step"]
    assert sum(host[k] for k in inner) < host["launch"]
    assert model_runner.sample is eager_sampler  # unwrapped again
    trace = json.loads(gzip.decompress((tmp_path / "trace_b2.json.gz").read_bytes()))
    assert any(e.get("cat") == "cpu_op" for e in trace["traceEvents"])


def test_host_phases_restores_what_it_wrapped():
    """host_phases wraps instance methods and a module function, and puts every one back."""
    from rollout.benchmarks.common import PhaseTimer

    llm = LLM("tiny", device="cpu", load_format="dummy")
    engine = llm.engine
    owners, eager_sampler = (engine, engine.runner, engine.scheduler), model_runner.sample
    before = [set(vars(o)) for o in owners]  # attribute names: the wrappers are instance attributes
    timer = PhaseTimer()
    with step_profile.host_phases(engine, timer):
        assert "launch" in vars(engine.runner) and model_runner.sample is not eager_sampler
        llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2), use_tqdm=False)
    assert [set(vars(o)) for o in owners] == before and model_runner.sample is eager_sampler
    assert timer.seconds["launch"] > timer.seconds["sample"] > 0
    llm.shutdown()


def test_launch_host_ms_times_idle_then_queued_calls():
    """The launch probe syncs before each idle call, then times calls back to back."""
    calls: list[str] = []

    def replay() -> None:
        calls.append("replay")
        time.sleep(0.002)

    idle, behind = launch_host_ms(replay, lambda: calls.append("sync"), n=3)
    assert calls == ["sync", "replay"] * 3 + ["sync"] + ["replay"] * 4 + ["sync"]
    assert idle >= 2.0 and behind >= 2.0  # ms: each call took its 2 ms sleep
