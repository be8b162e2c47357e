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
