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
    tokens in -1 (29 prompt tokens at 16 a step: two steps; the warm-up leaves nothing cached),
    decode batches of 1-2 rows in bucket 0."""
    from rollout.benchmarks.throughput import run_ours
    from rollout.benchmarks.workloads import Workload

    work = Workload("t", [[5] * 20, [7] * 9], [6, 4], 1.0)
    args = _args(max_batched=16, decode_pdl=True, trace=True)
    res = run_ours("tiny", work, args)
    buckets = res["step_ms_by_batch"]
    assert set(buckets) == {-1, 0} and buckets[-1][0] == 2 and buckets[0][0] >= 3
    assert sum(n for n, _ in buckets.values()) == res["num_steps"]
    assert res["out_tokens"] == 10 and len(res["admission_steps_ms"]) == buckets[-1][0]


def _args(**kw):
    """The child's options as its parser gives them (--gemv-rows 0 --piecewise-tokens 0
    --mixed-graph-tokens 0 on the CPU), then ``kw``."""
    import argparse

    from rollout.benchmarks.common import add_graph_args

    parser = argparse.ArgumentParser()
    add_graph_args(parser)
    args = parser.parse_args(["--gemv-rows", "0", "--piecewise-tokens", "0", "--mixed-graph-tokens", "0"])
    base = dict(
        max_batched=8192, trace=False, profile_admission=False, gc_freeze=False, profile=False,
        gpu_profile=False, result="unused.json",
    )  # fmt: skip
    return argparse.Namespace(**{**vars(args), **base, **kw})


def test_graph_argv_gives_back_the_options():
    """A child process gets the parent's engine options (add_graph_args -> graph_argv -> parse)."""
    import argparse

    from rollout.benchmarks.common import add_graph_args, graph_argv, graph_config

    parser = argparse.ArgumentParser()
    add_graph_args(parser)
    given = [
        "--gemv-whole-k",
        "--gemv-stages",
        "3",
        "--decode-pdl",
        "--no-gemv-pdl",
        "--fused-merge",
        "--graph-sampling",
        "--graph-inputs",
    ]
    args = parser.parse_args(given)
    again = parser.parse_args(graph_argv(args))
    assert vars(again) == vars(args)
    rc = graph_config(again)
    assert rc.small_batch_gemv_whole_k and rc.small_batch_gemv_stages == 3 and rc.decode_attention_pdl
    assert not rc.small_batch_gemv_pdl and rc.fused_decode_merge and rc.graph_sampling
    assert rc.graph_inputs


def test_timed_run_computes_every_prompt_token(monkeypatch):
    """The warm-up runs the workload's first prompts: it must not leave them in the prefix cache, or
    the timed generate skips their prefill (W1: 5,088 of 142,827 prompt tokens)."""
    import rollout
    from rollout.benchmarks.throughput import run_ours
    from rollout.benchmarks.workloads import Workload

    made = []

    class Spy(rollout.LLM):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)

    monkeypatch.setattr(rollout, "LLM", Spy)
    work = Workload("t", [[5] * 40, [7] * 33], [3, 2], 1.0)  # two full blocks each
    res = run_ours("tiny", work, _args())
    stats = made[0].stats()
    assert res["out_tokens"] == 5
    assert stats.num_cached_tokens == 0  # was 64: both prompts' full blocks, from the warm-up
    # warm-up and timed run each computed both prompts in full
    assert stats.num_prompt_tokens_computed == 2 * 73


def test_hf_peer_clock_covers_generation_only(monkeypatch):
    """The HF peer's clock starts after its batching manager is built and warmed up (CUDA graphs
    captured, on a GPU) and stops before it is torn down, as our engine's does; every request runs
    to its one max_new_tokens. A real tiny model through transformers' continuous batching on CPU;
    the manager's warm-up and tear-down are wrapped only to record when they ran."""
    import time

    from transformers import GenerationConfig
    from transformers.generation.continuous_batching import continuous_api as ca

    from rollout.benchmarks.throughput import hf_generate_timed
    from tests.models.tiny_models import tiny_config, tiny_hf_model

    events: list[tuple[str, float]] = []
    for name in ("warmup", "destroy"):
        orig = getattr(ca.ContinuousBatchingManager, name)

        def spy(self, *a, _orig=orig, _name=name, **k):
            events.append((_name, time.perf_counter()))
            return _orig(self, *a, **k)

        monkeypatch.setattr(ca.ContinuousBatchingManager, name, spy)
    model = tiny_hf_model(tiny_config("qwen3"))
    model.config._attn_implementation = "sdpa"
    gc = GenerationConfig(max_new_tokens=5, do_sample=False, eos_token_id=-1, pad_token_id=0)
    prompts = [[3] * 12, [4] * 9, [5] * 20]

    def sync() -> None:
        events.append(("sync", time.perf_counter()))

    seconds, outs = hf_generate_timed(model, prompts, gc, sync)
    assert sorted(len(o.generated_tokens) for o in outs.values()) == [5, 5, 5]
    names = [n for n, _ in events]
    assert names == ["warmup", "sync", "sync", "destroy"], names
    start, end = (t for n, t in events if n == "sync")
    assert seconds > 0 and start < end  # the clock ran between the two syncs (the order above)
