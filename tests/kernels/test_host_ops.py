"""rollout.benchmarks.host_ops under the interpreter: what a steady decode graph step launches from
the host, outside its graphs. With graph_sampling and graph_inputs both on, the device work left is
the staging copy, the RNG offsets' add and the results' copy; with graph_sampling alone, the six
input copies and the in-flight token fill are there too."""

from __future__ import annotations

import json

import pytest

from rollout.benchmarks import host_ops

pytestmark = pytest.mark.usefixtures("interpreter_engine")


def run(tmp_path, *options: str) -> dict:
    host_ops.main(["--batches", "2", "--steps", "2", "--out", str(tmp_path), *options])
    (row,) = json.loads((tmp_path / "host_ops.json").read_text())
    assert row["batch"] == 2 and row["graphs"]
    return row


def test_staged_sampled_steps_launch_three_operations(tmp_path):
    row = run(tmp_path, "--graph-sampling", "--graph-inputs")
    assert row["work_ops"] == {"copy_": 2 * 2, "add_": 1 * 2}  # per 2 steps
    assert row["triton_launches"] == {}
    copied = run(tmp_path, "--graph-sampling", "--no-graph-inputs")
    assert copied["work_ops"] == {"copy_": 7 * 2, "index_select": 2, "index_copy_": 2, "add_": 2}
    assert copied["per_step"]["ops"] > row["per_step"]["ops"]


def test_eager_sampler_counts_its_kernels(tmp_path):
    row = run(tmp_path, "--no-graph-sampling", "--graph-inputs")
    # the fused sampling kernel's two passes, and last_tokens written beside the results' packing
    assert row["triton_launches"] == {"_partials_kernel": 2, "_merge_kernel": 2}
    assert row["work_ops"]["copy_"] == 3 * 2 and row["work_ops"]["stack"] == 2


def test_cpu_needs_an_option_with_graphs(tmp_path):
    with pytest.raises(SystemExit, match="graph-inputs"):
        host_ops.main(["--batches", "1", "--no-graph-sampling", "--no-graph-inputs", "--out", str(tmp_path)])
