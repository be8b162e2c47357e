"""Eager steps of the triton attention backend run their forward on a padded token count (padding
rows: slot -1, no sequence in a mixed step, length-0 sequences in a decode step). Under the
interpreter on CPU the engine must give what the torch backend gives, which has no padding."""

from __future__ import annotations

import pytest

from rollout import LLM, CacheConfig, RunnerConfig, SamplingParams, SchedulerConfig
from rollout.cuda_graphs import padded_tokens
from tests.models.tiny_models import random_seqs, save_tiny_checkpoint

pytestmark = pytest.mark.usefixtures("interpreter_engine")


# overlap: placeholder tokens filled on the device; mixed: steps with prompt tokens in one (here
# uncaptured) whole-forward graph over static buffers, with the graph-safe attention grids
@pytest.mark.parametrize(("overlap", "mixed_graphs"), [(False, False), (True, False), (True, True)])
def test_triton_backend_pads_eager_steps_and_matches_torch(tmp_path, overlap, mixed_graphs):
    save_tiny_checkpoint(tmp_path, "qwen3")
    prompts = random_seqs([23, 5, 40], seed=4)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=0)
    outs, rows, graphed = {}, [], []
    for backend in ("torch", "triton"):
        llm = LLM(
            str(tmp_path),
            device="cpu",
            cache_config=CacheConfig(block_size=4, num_blocks=64),
            scheduler_config=SchedulerConfig(max_num_batched_tokens=27, overlap=overlap),
            runner_config=RunnerConfig(
                attention_backend=backend,
                max_mixed_graph_tokens=27 * mixed_graphs,
                graph_sampling=False,  # eager decode steps (no uncaptured graphs)
                graph_inputs=False,
            ),
        )
        runner = llm.engine.runner
        assert runner.attention_backend == backend
        if backend == "triton":  # (rows the forward ran on, tokens of the step)
            model = runner.model

            def launch(b, prev=None, f=runner.launch):
                rows.append([b.num_tokens, b.num_tokens > len(b.requests)])  # (tokens, has prompt rows)
                return f(b, prev)

            runner.launch = launch
            model.forward = lambda ids, *a, f=model.forward: rows[-1].append(ids.shape[0]) or f(ids, *a)
            assert (runner.mixed is not None) == mixed_graphs
            if mixed_graphs:
                runner.mixed.forward = lambda n, *a, f=runner.mixed.forward: graphed.append(n) or f(n, *a)
        outs[backend] = llm.generate(prompts, params, use_tqdm=False)
    for t, r in zip(outs["torch"], outs["triton"], strict=True):
        assert r.outputs[0].token_ids == t.outputs[0].token_ids
        got, want = r.outputs[0].logprobs, t.outputs[0].logprobs
        assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < 1e-4
    assert all(padded == padded_tokens(tokens, 27) for tokens, _, padded in rows), rows
    mixed = [(t, p) for t, _, p in rows if p > t and t > 3]  # chunked prompts beside decodes
    decodes = [(t, p) for t, _, p in rows if p > t and t == 3]  # three decodes -> 4 rows
    assert mixed and decodes, rows
    # every step with prompt tokens (and only those) ran the mixed graph of its padded size
    assert graphed == ([p for _, prompt, p in rows if prompt] if mixed_graphs else []), (graphed, rows)
