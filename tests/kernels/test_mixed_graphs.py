"""Mixed steps (prompt chunks beside decodes) in one whole-forward graph with graph-safe attention
grids (rollout/mixed_graphs.py). On CPU the graphs run uncaptured over their static buffers under
the Triton interpreter: an engine using them must give what the torch backend gives, with sliding
windows, prefix-cache hits and more decode rows than a step has sequences."""

from __future__ import annotations

import pytest
import torch

from rollout import LLM, CacheConfig, RunnerConfig, SamplingParams, SchedulerConfig
from rollout.mixed_graphs import MixedGraphs, MixedLayout
from tests.models.tiny_models import CASES, random_seqs, save_tiny_checkpoint

pytestmark = pytest.mark.usefixtures("interpreter_engine")


class CountedLaunches:
    """A Triton kernel whose launches (``kernel[grid](...)``) are counted."""

    def __init__(self, kernel) -> None:
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


# fused_merge: split decode launches merge in the kernel (RunnerConfig.fused_decode_merge), in the
# mixed graphs' decode rows and in the eager decode-only steps alike
@pytest.mark.parametrize("fused_merge", [False, True])
def test_mixed_graphs_match_the_torch_backend(tmp_path, monkeypatch, fused_merge):
    from rollout.kernels import decode_attention

    merges = CountedLaunches(decode_attention._merge_splits_kernel)
    monkeypatch.setattr(decode_attention, "_merge_splits_kernel", merges)
    family, overrides, block_size = CASES["mistral_sliding"]  # window 8, blocks of 4
    save_tiny_checkpoint(tmp_path, family, **overrides)
    prompts = random_seqs([30, 7, 19, 12], seed=6)
    params = SamplingParams(n=2, max_tokens=10, temperature=0, ignore_eos=True, logprobs=0)
    outs, calls = {}, []
    for backend in ("torch", "triton"):
        llm = LLM(
            str(tmp_path),
            device="cpu",
            cache_config=CacheConfig(block_size=block_size, num_blocks=128),
            scheduler_config=SchedulerConfig(max_num_batched_tokens=20, max_num_seqs=6, overlap=True),
            runner_config=RunnerConfig(
                attention_backend=backend,
                max_mixed_graph_tokens=20,
                fused_decode_merge=fused_merge,
                graph_sampling=False,  # eager decode steps (no uncaptured graphs)
                graph_inputs=False,
            ),
        )
        runner = llm.engine.runner
        if backend == "triton":
            mixed = runner.mixed
            assert mixed is not None and runner.pieces is None and runner.graphs is None  # CPU, eager decode

            def forward(size, inputs, fill=None, f=mixed.forward):
                calls.append((size, int((inputs["decode_lens"] > 0).sum()), fill is not None))
                return f(size, inputs, fill)

            mixed.forward = forward
        outs[backend] = llm.generate(prompts, params, use_tqdm=False)
        assert llm.stats().num_free_blocks == 128
    for t, r in zip(outs["torch"], outs["triton"], strict=True):
        for a, b in zip(t.outputs, r.outputs, strict=True):
            assert a.token_ids == b.token_ids
            assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)) < 1e-4
    # steps of every kind went through the graphs: with decode rows (up to max_num_seqs = 6 of the
    # 16-token graph's rows), without them, and with tokens of a step still in flight
    assert calls and any(d for _, d, _ in calls) and any(not d for _, d, _ in calls), calls
    assert any(fill for *_, fill in calls), calls
    assert all(size <= 20 for size, *_ in calls)
    counters = llm.engine.runner.split_counters
    assert (counters is not None) == fused_merge
    if fused_merge:  # no merge kernel ran, and every counter is back to zero
        assert merges.launches == 0 and not counters.any()
    else:
        assert merges.launches > 0


def test_mixed_graph_layouts_and_bad_sizes(tmp_path):
    family, overrides, block_size = CASES["qwen3"]
    save_tiny_checkpoint(tmp_path, family, **overrides)
    llm = LLM(
        str(tmp_path),
        device="cpu",
        cache_config=CacheConfig(block_size=block_size, num_blocks=32),
        scheduler_config=SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8),
        runner_config=RunnerConfig(attention_backend="triton", max_mixed_graph_tokens=40),
    )
    mixed = llm.engine.runner.mixed
    assert mixed is not None and mixed.sizes[0] == 2 and mixed.sizes[-1] == 32  # 48 > 40
    # 4 query heads over 2 KV heads pack into tiles of block_m // 2 positions, at least 16
    assert mixed.layout(2) == MixedLayout(decode_rows=2, tiles=1 + 2, tile_positions=16)
    assert mixed.layout(32) == MixedLayout(decode_rows=8, tiles=1 + 8, tile_positions=32)
    assert mixed.layout(3) is None and mixed.layout(48) is None
    with pytest.raises(ValueError, match="no mixed graph for 48 tokens"):
        mixed.forward(48, {})
    model = llm.engine.runner.model
    with pytest.raises(ValueError, match=">= 2"):
        MixedGraphs(model, [1, 4], 8, 4, 64, torch.device("cpu"))
    with pytest.raises(ValueError, match="max_seqs"):
        MixedGraphs(model, [4], 0, 4, 64, torch.device("cpu"))
    with pytest.raises(ValueError, match="max_mixed_graph_tokens"):
        RunnerConfig(max_mixed_graph_tokens=-1)
