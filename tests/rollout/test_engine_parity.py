"""End-to-end generation against Hugging Face transformers on tiny random checkpoints (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch

from rollout import LLM, CacheConfig, SamplingParams, SchedulerConfig
from tests.models.tiny_models import CASES, hf_logits, random_seqs, save_tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    made = {}
    for name, (family, overrides, _) in CASES.items():
        path = tmp_path_factory.mktemp(name)
        made[name] = (str(path), save_tiny_checkpoint(path, family, **overrides))
    return made


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_matches_hf_generate(checkpoints, case):
    path, hf = checkpoints[case]
    block_size = CASES[case][2]
    llm = LLM(path, device="cpu", cache_config=CacheConfig(block_size=block_size, num_blocks=64))
    prompts = random_seqs([3, 11, 26], seed=1)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)
    for prompt, out in zip(prompts, outs, strict=True):
        ref = hf.generate(
            torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=2, pad_token_id=0
        )[0, len(prompt) :].tolist()
        assert out.outputs[0].token_ids == ref
        expected = "stop" if ref[-1] == 2 else "length"
        assert out.outputs[0].finish_reason == expected
    assert llm.stats().num_free_blocks == 64


def test_logprobs_and_prompt_logprobs_match_hf(checkpoints):
    path, hf = checkpoints["qwen3"]
    llm = LLM(path, device="cpu", cache_config=CacheConfig(block_size=4, num_blocks=64))
    prompt = random_seqs([13], seed=2)[0]
    for mode, temperature in (("raw", 0.0), ("raw", 0.7), ("processed", 0.7)):
        params = SamplingParams(
            temperature=temperature,
            max_tokens=10,
            seed=3,
            logprobs=3,
            prompt_logprobs=2,
            logprobs_mode=mode,
            ignore_eos=True,
        )
        out = llm.generate([prompt], params, use_tqdm=False)[0]
        sample = out.outputs[0]
        seq = prompt + sample.token_ids
        logits = hf_logits(hf, [seq])[0]
        scale = temperature if mode == "processed" else 1.0
        ref = torch.log_softmax(logits / scale, dim=-1)
        # output token j was sampled from the logits at position len(prompt) + j - 1
        rows = ref[len(prompt) - 1 : len(seq) - 1]
        picked = rows.gather(1, torch.tensor(sample.token_ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(sample.logprobs), picked, atol=1e-4, rtol=0)
        for j, top in enumerate(sample.top_logprobs):
            want = torch.topk(rows[j], 3)
            assert list(top) == want.indices.tolist()
            torch.testing.assert_close(torch.tensor(list(top.values())), want.values, atol=1e-4, rtol=0)
        raw = torch.log_softmax(logits, dim=-1)
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
        want_prompt = raw[: len(prompt) - 1].gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(out.prompt_logprobs[1:]), want_prompt, atol=1e-4, rtol=0)
        assert all(len(t) == 2 for t in out.prompt_top_logprobs[1:])


def _cpu_llm(path: str, scheduler_config: SchedulerConfig) -> LLM:
    return LLM(
        path,
        device="cpu",
        cache_config=CacheConfig(block_size=4, num_blocks=64),
        scheduler_config=scheduler_config,
    )


def test_prompt_logprobs_are_computed_in_row_chunks(checkpoints):
    """Prompt logprobs take their logits in chunks of max_num_seqs rows (the profiled size), with the
    same values and top-k as one pass."""
    path, _ = checkpoints["qwen3"]
    prompt = random_seqs([13], seed=6)[0]
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=3)
    results, widest = [], []
    for max_seqs in (3, 256):
        llm = _cpu_llm(path, SchedulerConfig(max_num_seqs=max_seqs))
        model = llm.engine.runner.model
        compute = model.compute_logits
        rows: list[int] = []
        model.compute_logits = lambda h, compute=compute, rows=rows: rows.append(h.shape[0]) or compute(h)
        results.append(llm.generate([prompt], params, use_tqdm=False)[0])
        widest.append(max(rows))
    assert widest == [3, 12]  # 12 prompt positions predict a next prompt token
    torch.testing.assert_close(
        torch.tensor(results[0].prompt_logprobs[1:]),
        torch.tensor(results[1].prompt_logprobs[1:]),
        atol=1e-6,
        rtol=0,
    )
    for a, b in zip(results[0].prompt_top_logprobs[1:], results[1].prompt_top_logprobs[1:], strict=True):
        assert list(a) == list(b)
        torch.testing.assert_close(
            torch.tensor(list(a.values())), torch.tensor(list(b.values())), atol=1e-6, rtol=0
        )


def test_chunked_prompt_logprobs_match_unchunked(checkpoints):
    path, _ = checkpoints["llama3_rope"]
    prompt = random_seqs([40], seed=5)[0]
    params = SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=0)
    results = []
    for budget in (7, 4096):
        llm = _cpu_llm(path, SchedulerConfig(max_num_batched_tokens=budget))
        results.append(llm.generate([prompt], params, use_tqdm=False)[0])
    torch.testing.assert_close(
        torch.tensor(results[0].prompt_logprobs[1:]),
        torch.tensor(results[1].prompt_logprobs[1:]),
        atol=1e-5,
        rtol=0,
    )
    assert results[0].outputs[0].token_ids == results[1].outputs[0].token_ids


def test_one_token_prompt_logprobs_have_one_entry(tmp_path):
    # one entry per prompt token, the first None, for a 1-token prompt too (it got [])
    save_tiny_checkpoint(tmp_path, "qwen3")
    llm = LLM(str(tmp_path), device="cpu", cache_config=CacheConfig(block_size=4, num_blocks=16))
    params = SamplingParams(n=2, temperature=0, max_tokens=2, prompt_logprobs=1)
    for prompt in ([17], [17, 42]):
        out = llm.generate([prompt], params, use_tqdm=False)[0]
        assert len(out.prompt_logprobs) == len(out.prompt_top_logprobs) == len(prompt)
        assert out.prompt_logprobs[0] is None and out.prompt_top_logprobs[0] is None
