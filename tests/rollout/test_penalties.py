"""Repetition, frequency and presence penalties end to end: greedy tokens equal HF transformers'
``generate(repetition_penalty=...)`` and a step-by-step reference over HF logits for the OpenAI
penalties; the overlapped loop (whose last token is still on the device when the next step is
prepared) gives the same tokens as the plain one; rows without penalties are untouched."""

from __future__ import annotations

import pytest
import torch

from rollout import LLM, CacheConfig, SamplingParams, SchedulerConfig
from tests.models.tiny_models import random_seqs, save_tiny_checkpoint

PROMPTS = random_seqs([7, 12, 3], vocab=300, seed=5)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3-penalties")
    model = save_tiny_checkpoint(path, "qwen3", seed=3)
    return str(path), model.float().eval()


def _engine(path: str, overlap: bool) -> LLM:
    return LLM(
        path,
        device="cpu",
        cache_config=CacheConfig(block_size=4, num_blocks=256),
        scheduler_config=SchedulerConfig(max_num_batched_tokens=16, overlap=overlap),
    )


@torch.no_grad()
def _reference(
    model, prompt: list[int], steps: int, presence: float, frequency: float, rep: float
) -> list[int]:
    """Greedy decoding with the penalties applied to HF's float32 logits, one full forward per token."""
    seq = list(prompt)
    for _ in range(steps):
        logits = model(input_ids=torch.tensor([seq])).logits[0, -1].float()
        seen = torch.zeros_like(logits, dtype=torch.bool)
        seen[seq] = True
        logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
        counts = torch.bincount(torch.tensor(seq[len(prompt) :], dtype=torch.long), minlength=logits.numel())
        logits = logits - frequency * counts - presence * (counts > 0)
        seq.append(int(logits.argmax()))
    return seq[len(prompt) :]


@pytest.mark.parametrize("overlap", [False, True])
def test_repetition_penalty_matches_hf_generate(checkpoint, overlap):
    path, model = checkpoint
    llm = _engine(path, overlap)
    for rep in (1.3, 0.8):
        params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, repetition_penalty=rep)
        outs = llm.generate(PROMPTS, params, use_tqdm=False)
        for prompt, out in zip(PROMPTS, outs, strict=True):
            ref = model.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),  # token 0 is not padding
                do_sample=False,
                max_new_tokens=20,
                min_new_tokens=20,
                repetition_penalty=rep,
                pad_token_id=0,
            )[0, len(prompt) :].tolist()
            assert out.outputs[0].token_ids == ref, (rep, prompt)


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize(
    ("presence", "frequency", "rep"), [(1.5, 0.0, 1.0), (0.0, 0.7, 1.0), (-0.5, 0.4, 1.2)]
)
def test_frequency_and_presence_penalties_match_the_reference(checkpoint, overlap, presence, frequency, rep):
    path, model = checkpoint
    llm = _engine(path, overlap)
    params = SamplingParams(
        temperature=0.0,
        max_tokens=16,
        ignore_eos=True,
        presence_penalty=presence,
        frequency_penalty=frequency,
        repetition_penalty=rep,
        logprobs_mode="processed",
    )
    plain = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    # penalized and plain rows in one batch: the plain rows must not feel the others' penalties
    outs = llm.generate(PROMPTS + PROMPTS, [params] * 3 + [plain] * 3, use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs[:3], strict=True):
        assert out.outputs[0].token_ids == _reference(model, prompt, 16, presence, frequency, rep)
        assert all(lp <= 0.0 for lp in out.outputs[0].logprobs)
    for prompt, out in zip(PROMPTS, outs[3:], strict=True):
        assert out.outputs[0].token_ids == _reference(model, prompt, 16, 0.0, 0.0, 1.0)


def test_the_penalties_change_what_is_sampled(checkpoint):
    # Without penalties this model repeats itself; a strong frequency penalty keeps any token from
    # dominating, and seeded sampling with penalties is the same in both loops.
    path, _ = checkpoint
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    plain = _engine(path, False).generate(PROMPTS, params, use_tqdm=False)
    penalized = _engine(path, False).generate(PROMPTS, params.replace(frequency_penalty=2.0), use_tqdm=False)
    most_plain = max(max(o.outputs[0].token_ids.count(t) for t in o.outputs[0].token_ids) for o in plain)
    most_pen = max(max(o.outputs[0].token_ids.count(t) for t in o.outputs[0].token_ids) for o in penalized)
    assert most_pen < most_plain
    seeded = SamplingParams(
        temperature=1.0, seed=11, max_tokens=24, ignore_eos=True, presence_penalty=1.0, n=2
    )
    a = _engine(path, False).generate(PROMPTS, seeded, use_tqdm=False)
    b = _engine(path, True).generate(PROMPTS, seeded, use_tqdm=False)
    assert [[c.token_ids for c in o.outputs] for o in a] == [[c.token_ids for c in o.outputs] for o in b]


@pytest.mark.parametrize("overlap", [False, True])
def test_logit_bias(checkpoint, overlap):
    """A +100 bias makes its token the only choice, greedy or sampled; a -100 bias on the greedy
    token moves the argmax to the runner-up; plain rows in the same batch are untouched; a token
    outside the vocabulary is refused at admission and queues nothing."""
    path, model = checkpoint
    llm = _engine(path, overlap)
    plain = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    forced = [
        plain.replace(logit_bias={42: 100.0}),
        plain.replace(temperature=1.0, seed=3, logit_bias={42: 100.0}),
    ]
    outs = llm.generate(PROMPTS[:2] + PROMPTS[:1], forced + [plain], use_tqdm=False)
    assert outs[0].outputs[0].token_ids == outs[1].outputs[0].token_ids == [42] * 6
    assert outs[2].outputs[0].token_ids == _reference(model, PROMPTS[0], 6, 0.0, 0.0, 1.0)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([PROMPTS[0]])).logits[0, -1]
    first, second = logits.topk(2).indices.tolist()
    out = llm.generate([PROMPTS[0]], plain.replace(max_tokens=1, logit_bias={first: -100.0}), use_tqdm=False)
    assert out[0].outputs[0].token_ids == [second]
    with pytest.raises(ValueError, match="logit_bias has token 300"):
        llm.generate([PROMPTS[0]], plain.replace(logit_bias={300: 1.0}), use_tqdm=False)
    assert not llm.engine.has_unfinished() and llm.stats().num_free_blocks == llm.stats().num_blocks


@pytest.mark.parametrize("overlap", [False, True])
def test_steady_penalized_decode_sends_no_history(checkpoint, overlap, sampling_builds):
    """After its first sampling step, a steady penalized batch reuses its tensors and counts each
    step's sampled tokens on the device: one build for the whole generation, same tokens."""
    path, model = checkpoint
    builds = sampling_builds
    llm = _engine(path, overlap)
    params = SamplingParams(
        temperature=0.0, max_tokens=16, ignore_eos=True, frequency_penalty=0.7, repetition_penalty=1.2
    )
    out = llm.generate([PROMPTS[1]], params, use_tqdm=False)[0].outputs[0].token_ids
    assert out == _reference(model, PROMPTS[1], 16, 0.0, 0.7, 1.2)
    assert builds == [1]


def test_extreme_repetition_penalties_keep_logprobs_finite(checkpoint):
    """The bounds of repetition_penalty with a temperature just above greedy: the penalized,
    scaled float32 logits stay finite, so processed logprobs are numbers (1e-40 gave NaN)."""
    path, _ = checkpoint
    llm = _engine(path, overlap=False)
    for rep in (1e-6, 1e6):
        params = SamplingParams(
            temperature=2e-5, repetition_penalty=rep, max_tokens=8, ignore_eos=True, seed=1,
            logprobs=5, logprobs_mode="processed",
        )  # fmt: skip
        for out in llm.generate(PROMPTS, params, use_tqdm=False):
            completion = out.outputs[0]
            assert all(-1e30 < lp <= 0.0 for lp in completion.logprobs), (rep, completion.logprobs)
            top = [lp for step in completion.top_logprobs for lp in step.values()]
            assert top and all(lp <= 0.0 for lp in top), rep
