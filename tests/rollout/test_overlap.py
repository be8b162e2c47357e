"""The overlapped engine loop (SchedulerConfig.overlap) against the plain one, on the CPU: the same
tokens for seeded and greedy requests under prefix caching, preemption, stops and aborts, no leaked
blocks, and each token tagged with the weight version of the step that computed it."""

from __future__ import annotations

import random

import pytest
import torch

from rollout import LLM, CacheConfig, SamplingParams, SchedulerConfig


def _prompts(seed: int, num: int = 8) -> list[list[int]]:
    rng = random.Random(seed)
    system = [rng.randrange(3, 250) for _ in range(30)]
    return [
        system[: rng.randint(3, 30)] + [rng.randrange(3, 250) for _ in range(rng.randint(1, 12))]
        for _ in range(num)
    ]


def _engine(overlap: bool, num_blocks: int = 256, budget: int = 64, max_seqs: int = 8) -> LLM:
    return LLM(
        "tiny",
        device="cpu",
        cache_config=CacheConfig(block_size=4, num_blocks=num_blocks),
        scheduler_config=SchedulerConfig(
            max_num_batched_tokens=budget, max_num_seqs=max_seqs, overlap=overlap
        ),
    )


def _params(rng: random.Random, i: int) -> SamplingParams:
    kind = i % 6
    if kind == 0:
        return SamplingParams(temperature=0.0, max_tokens=rng.randint(1, 20), ignore_eos=True, logprobs=2)
    if kind == 1:
        return SamplingParams(temperature=1.0, seed=i, n=2, max_tokens=rng.randint(5, 25), ignore_eos=True)
    if kind == 2:  # stops on some common token ids, after a minimum
        return SamplingParams(
            temperature=0.8, seed=100 + i, max_tokens=30, stop_token_ids=list(range(3, 60)), min_tokens=3
        )
    if kind == 3:
        return SamplingParams(temperature=1.0, seed=7 * i, max_tokens=12, top_k=20, prompt_logprobs=1)
    if kind == 4:  # penalties: the token history, part of it still on the device in the overlapped loop
        return SamplingParams(
            temperature=0.9,
            seed=40 + i,
            n=2,
            max_tokens=rng.randint(8, 24),
            ignore_eos=True,
            presence_penalty=0.8,
            frequency_penalty=0.5,
            repetition_penalty=1.3,
        )
    return SamplingParams(  # biases and a penalty on a greedy row, processed logprobs
        temperature=0.0,
        max_tokens=14,
        min_tokens=2,
        logit_bias={7: 3.0, 11: -2.0},
        repetition_penalty=0.9,
        logprobs=1,
        logprobs_mode="processed",
    )


def _check_idle(llm: LLM) -> None:
    engine = llm.engine
    assert not engine.has_unfinished() and engine._inflight is None
    stats = engine.stats()
    assert stats.num_free_blocks == stats.num_blocks, "blocks leaked"
    engine.check_invariants()


@pytest.mark.parametrize(("num_blocks", "budget"), [(256, 64), (24, 16)])  # roomy; tight (preemption)
def test_overlap_gives_the_same_outputs(num_blocks, budget):
    prompts = _prompts(1)
    rng = random.Random(3)
    params = [_params(rng, i) for i in range(len(prompts))]
    results = {}
    for overlap in (False, True):
        llm = _engine(overlap, num_blocks, budget)
        assert llm.engine.overlap is overlap
        results[overlap] = llm.generate(prompts, params, use_tqdm=False)
        _check_idle(llm)
        if num_blocks == 24:
            assert llm.stats().num_preemptions > 0
    for a, b in zip(results[False], results[True], strict=True):
        assert a.prompt_logprobs == b.prompt_logprobs or torch.allclose(
            torch.tensor(a.prompt_logprobs[1:]), torch.tensor(b.prompt_logprobs[1:]), atol=1e-5
        )
        for x, y in zip(a.outputs, b.outputs, strict=True):
            assert x.token_ids == y.token_ids
            assert (x.finish_reason, x.stop_reason) == (y.finish_reason, y.stop_reason)
            torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-5, rtol=0)
            if x.top_logprobs is not None:
                assert [list(t) for t in x.top_logprobs] == [list(t) for t in y.top_logprobs]


def test_overlap_streaming_aborts_and_weight_versions():
    prompts = _prompts(2, 6)
    params = SamplingParams(temperature=1.0, seed=5, max_tokens=16, ignore_eos=True)
    ref = _engine(False).generate(prompts, params, use_tqdm=False)
    llm = _engine(True)
    engine = llm.engine
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params)
    streamed: dict[str, list[int]] = {}
    versions: dict[str, list[int]] = {}
    steps = 0
    while engine.has_unfinished():
        steps += 1
        if steps == 4:
            engine.abort(["r1"])
        if steps == 6:
            engine.weight_version = 9  # what an in-place update does between steps
        for delta in engine.step_deltas():
            for s in delta.samples:
                streamed.setdefault(delta.request_id, []).extend(s.token_ids)
                versions.setdefault(delta.request_id, []).extend(s.weight_versions)
    _check_idle(llm)
    for i, out in enumerate(ref):
        rid = f"r{i}"
        if rid == "r1":
            assert streamed[rid] == out.outputs[0].token_ids[: len(streamed[rid])]
            assert len(streamed[rid]) < 16
            continue
        assert streamed[rid] == out.outputs[0].token_ids
        # tokens computed before the update keep version 0, later ones 9, and versions never go back
        assert versions[rid] == sorted(versions[rid]) and versions[rid][0] == 0 and versions[rid][-1] == 9


@pytest.mark.parametrize("overlap", [False, True])
def test_blocks_completed_by_sampled_tokens_are_cached(overlap):
    """A block filled by sampled tokens is cached once its last token is known (in the overlapped
    loop that is a step after it was computed): a prompt that continues an output hits it."""
    llm = _engine(overlap)
    prompt = list(range(3, 9))  # 6 tokens: the first block is prompt, the next ones are outputs
    first = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))[0]
    # 16 tokens, the last one never computed: blocks 0-2 (12 tokens) are full and computed
    follow = prompt + first.outputs[0].token_ids + [5, 6, 7]
    out = llm.generate([follow], SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))[0]
    assert out.num_cached_tokens == 12
    _check_idle(llm)
