"""bf16 parity on the GPU (run on the device machine): the engine vs HF transformers on the same
random tiny checkpoints. bf16 rounding differs between implementations, so logits are compared by
relative error against the fp32 reference, and greedy tokens must match HF's bf16 greedy tokens
wherever the fp32 reference has a clear winner."""

from __future__ import annotations

import pytest
import torch

from rollout import LLM, CacheConfig, RunnerConfig, SamplingParams
from tests.models.tiny_models import CASES, random_seqs, save_tiny_checkpoint

pytestmark = pytest.mark.gpu


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("case", list(CASES))
def test_bf16_logprobs_and_greedy_match_hf(tmp_path, case):
    family, overrides, block_size = CASES[case]
    hf32 = save_tiny_checkpoint(tmp_path, family, **overrides).cuda()
    hf16 = save_tiny_checkpoint(tmp_path / "copy", family, **overrides).to("cuda", torch.bfloat16)
    llm = LLM(
        str(tmp_path), device="cuda", dtype="bfloat16", cache_config=CacheConfig(block_size, num_blocks=256)
    )
    prompts = random_seqs([5, 19, 40], seed=3)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=1)
    outs = llm.generate(prompts, params, use_tqdm=False)
    for prompt, out in zip(prompts, outs, strict=True):
        ours = out.outputs[0]
        seq = torch.tensor([prompt + ours.token_ids], device="cuda")
        with torch.no_grad():
            ref32 = torch.log_softmax(hf32(seq).logits[0].float(), -1)[len(prompt) - 1 : -1]
            ref16 = torch.log_softmax(hf16(seq).logits[0].float(), -1)[len(prompt) - 1 : -1]
        picked32 = ref32.gather(1, torch.tensor(ours.token_ids, device="cuda")[:, None])[:, 0]
        # our sampled-token logprobs agree with fp32 as closely as HF's own bf16 run does (plus slack)
        ours_lp = torch.tensor(ours.logprobs, device="cuda")
        hf16_lp = ref16.gather(1, torch.tensor(ours.token_ids, device="cuda")[:, None])[:, 0]
        noise = 2 * (hf16_lp - picked32).abs().max() + 0.02
        assert (ours_lp - picked32).abs().max() <= noise
        # every greedy choice is the fp32 argmax unless the fp32 top-2 margin is within bf16 noise
        # (the same bound: with the fused kernels a 0.06 margin once flipped where ours was 0.04 off)
        top2 = ref32.topk(2, dim=-1).values
        margin = top2[:, 0] - top2[:, 1]
        wrong = picked32 < top2[:, 0] - 1e-6
        assert not bool((wrong & (margin > max(0.05, float(noise)))).any()), (
            f"greedy diverged where fp32 had a clear winner ({case})"
        )
    assert llm.stats().num_free_blocks == 256


def test_kv_cache_sized_from_gpu_memory():
    free_before, total = torch.cuda.mem_get_info()
    llm = LLM("tiny", device="cuda", cache_config=CacheConfig(gpu_memory_utilization=0.3))
    engine = llm.engine
    kv_bytes = engine.runner.num_blocks * engine.runner.block_bytes()
    assert 0.15 * total < kv_bytes < 0.3 * total
    out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4
    del llm, engine


def test_memory_profile_covers_a_costly_sampling_step(tmp_path):
    """The KV cache gets what is left after the profiled step's peak, so a real step of max_num_seqs
    rows sampled the costliest way (top-p's full sort, min-p, penalties, processed top logprobs:
    [rows, vocab] fp32 temporaries) must not take more memory than the profile counted. A wide
    vocabulary on a tiny body makes the sampler the step's largest cost."""
    from rollout import SchedulerConfig

    save_tiny_checkpoint(tmp_path, "qwen3", vocab_size=32000)
    llm = LLM(
        str(tmp_path),
        device="cuda",
        dtype="bfloat16",
        cache_config=CacheConfig(gpu_memory_utilization=0.3),
        scheduler_config=SchedulerConfig(max_num_seqs=128, max_num_batched_tokens=128),
    )
    runner = llm.engine.runner
    assert runner.profiled_step_bytes is not None
    params = SamplingParams(
        top_p=0.9,
        min_p=0.01,
        repetition_penalty=1.1,
        frequency_penalty=0.1,
        logprobs=20,
        logprobs_mode="processed",
        max_tokens=3,
        ignore_eos=True,
    )
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = llm.generate([[i % 50 + 1] for i in range(128)], params, use_tqdm=False)
    step_bytes = torch.cuda.max_memory_allocated() - base
    assert all(len(o.outputs[0].token_ids) == 3 for o in out)
    # the sampler's temporaries alone are several [128, vocab] fp32 tensors
    assert step_bytes > 4 * 128 * runner.vocab_size * 4
    assert step_bytes <= runner.profiled_step_bytes, (step_bytes, runner.profiled_step_bytes)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fast_path_matches_torch_path(tmp_path, dtype):
    """Triton attention + CUDA graphs vs the torch attention path, eager, on the same weights."""
    family, overrides, block_size = CASES["qwen3"]
    save_tiny_checkpoint(tmp_path, family, **overrides)
    prompts = random_seqs([3, 9, 17, 33, 64, 5, 70, 12, 40, 2, 50], seed=4)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    results = {}
    for name, cfg in {
        "torch": RunnerConfig(attention_backend="torch", cuda_graphs=False),
        "triton": RunnerConfig(attention_backend="triton", cuda_graphs=False),
        "graphs": RunnerConfig(attention_backend="triton", cuda_graphs=True, max_graph_batch=16),
    }.items():
        llm = LLM(
            str(tmp_path),
            device="cuda",
            dtype=dtype,
            runner_config=cfg,
            cache_config=CacheConfig(block_size, num_blocks=512),
        )
        if name == "graphs":
            assert llm.engine.runner.graphs is not None
        results[name] = llm.generate(prompts, params, use_tqdm=False)
        assert llm.stats().num_free_blocks == 512
    tol = 1e-3 if dtype == "float32" else 0.05
    for name in ("triton", "graphs"):
        for a, b in zip(results["torch"], results[name], strict=True):
            ta, tb = a.outputs[0].token_ids, b.outputs[0].token_ids
            same = next((i for i, (x, y) in enumerate(zip(ta, tb, strict=True)) if x != y), len(ta))
            if dtype == "float32":
                assert same == len(ta), f"{name}: greedy tokens differ from the torch path at {same}"
            la = torch.tensor(a.outputs[0].logprobs[:same])
            lb = torch.tensor(b.outputs[0].logprobs[:same])
            assert (la - lb).abs().max() <= tol, name


def test_graph_steps_with_one_token_prompt_chunks():
    """A 1-token budget left for a prompt chunk next to a decode makes a step of one token per
    request, which a decode graph serves: the prompt row samples nothing, but its prompt logprobs
    come from the graph's hidden states and the decode row's token from the graph's logits (rows
    picked by a gather, not the leading-rows view). Graphs vs eager, fp32: the same tokens, logprobs
    and prompt logprobs."""
    import tempfile

    from rollout import SchedulerConfig

    family, overrides, block_size = CASES["qwen3"]
    with tempfile.TemporaryDirectory() as tmp:
        save_tiny_checkpoint(tmp, family, **overrides)
        results = {}
        for graphs in (False, True):
            llm = LLM(
                tmp,
                device="cuda",
                dtype="float32",
                runner_config=RunnerConfig(cuda_graphs=graphs, max_graph_batch=8),
                cache_config=CacheConfig(block_size, num_blocks=256),
                # step 1: A's 2-token prompt; then A decodes next to 1-token chunks of B's prompt
                scheduler_config=SchedulerConfig(max_num_batched_tokens=2),
            )
            assert (llm.engine.runner.graphs is not None) == graphs
            prompts = [[5, 9], random_seqs([12], seed=7)[0]]
            params = [
                SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=0),
                SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, prompt_logprobs=2),
            ]
            results[graphs] = llm.generate(prompts, params, use_tqdm=False)
            assert llm.stats().num_free_blocks == 256
        for a, b in zip(results[False], results[True], strict=True):
            assert a.outputs[0].token_ids == b.outputs[0].token_ids
            la, lb = torch.tensor(a.outputs[0].logprobs), torch.tensor(b.outputs[0].logprobs)
            assert (la - lb).abs().max() <= 1e-4
        pa, pb = results[False][1].prompt_logprobs, results[True][1].prompt_logprobs
        assert pa[0] is None and pb[0] is None and len(pa) == len(pb) == 12
        assert (torch.tensor(pa[1:]) - torch.tensor(pb[1:])).abs().max() <= 1e-4
