"""The host-overhead bench runs on the CPU and times every phase it names: it wraps the engine's own
methods by name, so a renamed method must fail here rather than silently drop out of the numbers."""

from __future__ import annotations

import json

import rollout.model_runner as model_runner
from rollout.benchmarks import host_overhead

PHASES = {
    "schedule", "update_computed", "sampling_rows", "prepare", "to_device", "forward", "logits",
    "sample", "sampling_tensors", "collect", "process", "other",
}  # fmt: skip


def test_host_overhead_bench_times_every_phase(tmp_path):
    eager_sampler = model_runner.sample
    host_overhead.main(["--device", "cpu", "--batches", "1", "3", "--steps", "4", "--out", str(tmp_path)])
    assert model_runner.sample is eager_sampler  # the wrapped module function is put back
    rows = json.loads((tmp_path / "host_overhead.json").read_text())
    assert [r["batch"] for r in rows] == [1, 3]
    for r in rows:
        assert set(r["phases_ms"]) >= PHASES
        assert all(v >= 0 for k, v in r["phases_ms"].items() if k != "other")
        assert 0 < r["host_ms"] < r["step_ms"] and r["api"] == "step_outputs"


def test_host_overhead_bench_times_the_admission_phase(tmp_path):
    host_overhead.main(
        ["--device", "cpu", "--batches", "1", "--steps", "2", "--admission", "5", "--prompt-len", "20", "40",
         "--max-batched", "48", "--out", str(tmp_path)]
    )  # fmt: skip
    rows = json.loads((tmp_path / "host_overhead.json").read_text())
    adm = rows[-1]
    assert adm["admission"] == 5 and 100 <= adm["prompt_tokens"] <= 200
    # every prompt token is computed within the 48-token budgets of the steps
    assert adm["steps"] >= -(-adm["prompt_tokens"] // 48)
    assert set(adm["phases_ms"]) >= PHASES | {"add_request"}
    assert adm["phases_ms"]["forward"] > 0 and adm["step_ms"] > 0
