"""L2 prefetch of weights (kernels/prefetch.py, rollout/prefetch.py): every word of the tensor is
read, bad tensors are refused, and a model forward with the prefetch hooks gives the same outputs
(the prefetch only reads). On CPU the kernel runs under the Triton interpreter, inline."""

from __future__ import annotations

import pytest
import torch

from rollout import LLM, CacheConfig, RunnerConfig, SamplingParams
from rollout.kernels.prefetch import prefetch_l2
from rollout.prefetch import WeightPrefetch
from tests.models.tiny_models import random_seqs, save_tiny_checkpoint

pytestmark = pytest.mark.usefixtures("triton_interpreter")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def wrapped_sum(words: torch.Tensor) -> int:
    """The int32 sum with wrap-around, as the kernel computes it."""
    total = int(words.long().sum()) % (1 << 32)
    return total - (1 << 32) if total >= 1 << 31 else total


@pytest.mark.parametrize(("numel", "dtype", "programs"), [
    (10, torch.float32, 4),  # fewer words than one block: one program
    (3 * 8192 + 5, torch.int32, 2),  # two programs, ragged end
    (40000, torch.bfloat16, 3),  # bf16 read as words
])  # fmt: skip
def test_prefetch_reads_every_word(numel, dtype, programs):
    gen = torch.Generator().manual_seed(numel)
    tensor = torch.randint(-(1 << 30), 1 << 30, (numel,), generator=gen).to(dtype).to(DEVICE)
    sink = torch.zeros(programs, dtype=torch.int32, device=DEVICE)
    launched = prefetch_l2(tensor, sink)
    words = tensor.view(torch.int32)
    assert 1 <= launched <= programs
    assert wrapped_sum(sink[:launched]) == wrapped_sum(words)
    assert launched == min(programs, -(-words.numel() // 8192))


def test_prefetch_refuses_bad_tensors():
    sink = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="contiguous"):
        prefetch_l2(torch.zeros(4, 4, device=DEVICE).t(), sink)
    with pytest.raises(ValueError, match="4-byte"):
        prefetch_l2(torch.zeros(3, dtype=torch.bfloat16, device=DEVICE), sink)
    with pytest.raises(ValueError, match="sink"):
        prefetch_l2(torch.zeros(4, device=DEVICE), sink.long())
    with pytest.raises(ValueError, match="num_programs"):
        WeightPrefetch(torch.nn.Module(), torch.device(DEVICE), 0)
    with pytest.raises(ValueError, match="prefetch_programs"):
        RunnerConfig(prefetch_programs=0)


def test_forward_with_prefetch_hooks_gives_the_same_outputs(tmp_path):
    save_tiny_checkpoint(tmp_path, "qwen3")
    llm = LLM(
        str(tmp_path),
        device="cpu",
        cache_config=CacheConfig(block_size=4, num_blocks=64),
        runner_config=RunnerConfig(attention_backend="triton"),
    )
    prompts = random_seqs([9, 4], seed=3)
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, logprobs=0)
    want = llm.generate(prompts, params, use_tqdm=False)
    runner = llm.engine.runner
    prefetch = WeightPrefetch(runner.model, runner.device, 3)
    steps = []
    runner.model.forward = lambda *a, f=runner.model.forward: steps.append(1) or f(*a)
    with prefetch.hooks():
        got = llm.generate(prompts, params, use_tqdm=False)
    # per forward: o_proj, gate_up, down of each layer and the next layer's qkv
    layers = len(runner.model.model.layers)
    assert prefetch.launches == len(steps) * (4 * layers - 1) and steps
    for a, b in zip(want, got, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].logprobs == b.outputs[0].logprobs
    assert not runner.model.model._forward_hooks  # the hooks are gone after the block
    assert not runner.model.model.layers[0].self_attn.qkv_proj._forward_hooks
