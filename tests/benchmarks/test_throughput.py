"""The throughput bench's --repeats keeps the median run (W1 moves by a few % between runs)."""

from __future__ import annotations

from rollout.benchmarks.throughput import median_run


def test_throughput_keeps_the_median_run():
    runs = [
        {"out_tok_s": 18000.0, "k": 1},
        {"error": "boom"},
        {"out_tok_s": 17000.0, "k": 2},
        {"out_tok_s": 19000.0},
    ]
    res = median_run(runs)
    assert res["k"] == 1 and res["repeats_tok_s"] == [18000.0, None, 17000.0, 19000.0]
    assert median_run([{"out_tok_s": 5.0}]) == {"out_tok_s": 5.0}  # one run: as it was
    assert median_run([{"error": "x"}, {"error": "y"}])["error"] == "x"
    assert "repeats_tok_s" not in runs[0]  # the runs themselves are left as they were


def test_trace_times_each_step_by_the_batch_it_collected():
    """--trace on the CPU with the tiny model: every step lands in one bucket, batches with prompt
    tokens in -1 (the warm-up left the prompts' full blocks cached: 13 tokens to compute, one
    step), decode batches of 1-2 rows in bucket 0."""
    import argparse

    from rollout.benchmarks.throughput import run_ours
    from rollout.benchmarks.workloads import Workload

    work = Workload("t", [[5] * 20, [7] * 9], [6, 4], 1.0)
    args = argparse.Namespace(
        max_batched=16, piecewise_tokens=0, mixed_graph_tokens=0, fused_merge=False,
        gemv_rows=0, gemv_pdl=False, decode_rope=True, decode_pdl=True, trace=True, profile_admission=False,
        gc_freeze=False, profile=False, gpu_profile=False, result="unused.json",
    )  # fmt: skip
    res = run_ours("tiny", work, args)
    buckets = res["step_ms_by_batch"]
    assert set(buckets) == {-1, 0} and buckets[-1][0] == 1 and buckets[0][0] >= 3
    assert sum(n for n, _ in buckets.values()) == res["num_steps"]
    assert res["out_tokens"] == 10 and len(res["admission_steps_ms"]) == buckets[-1][0]
