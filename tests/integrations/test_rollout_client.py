"""RolloutClient / RolloutBatch contracts, and the engine's sampled logprobs against the trainer's
recomputation of the same tokens on the same weights (the training-inference mismatch)."""

from __future__ import annotations

import pytest
import torch

from rollout import SamplingParams
from rollout.integrations.rollout_client import RolloutBatch, sequence_logprobs
from rollout.outputs import CompletionOutput, RequestOutput

PROMPTS = [[72, 101, 108, 108, 111], [49, 43, 50, 61], [7, 8, 9, 10, 11, 12, 13, 14, 15]]


def test_batch_shapes_order_and_alignment(client):
    params = SamplingParams(max_tokens=6, seed=3, temperature=0.8)
    batch = client.generate(PROMPTS, n=3, params=params)
    assert len(batch) == 9 and batch.n == 3 and batch.num_prompts == 3
    assert batch.group_ids == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # prompt-major
    for r in range(len(batch)):
        assert batch.prompt_ids[r] == PROMPTS[batch.group_ids[r]]
        k = len(batch.completion_ids[r])
        assert 1 <= k <= 6
        assert len(batch.logprobs[r]) == len(batch.loss_masks[r]) == len(batch.weight_versions[r]) == k
        assert batch.finish_reasons[r] in ("stop", "length")
        assert batch.loss_masks[r] == [1] * k
        assert all(lp <= 0.0 for lp in batch.logprobs[r])
        assert set(batch.weight_versions[r]) == {client.weight_version}

    padded = batch.padded(pad_token_id=259)
    B, T = padded.input_ids.shape
    assert (
        B == 9
        and max(len(p) + len(c) for p, c in zip(batch.prompt_ids, batch.completion_ids, strict=True)) == T
    )
    for r in range(B):
        P, C = len(batch.prompt_ids[r]), len(batch.completion_ids[r])
        assert padded.prompt_lens[r] == P and padded.completion_lens[r] == C
        assert padded.input_ids[r, :P].tolist() == batch.prompt_ids[r]
        assert padded.input_ids[r, P : P + C].tolist() == batch.completion_ids[r]
        assert (padded.input_ids[r, P + C :] == 259).all()
        assert padded.attention_mask[r].tolist() == [1] * (P + C) + [0] * (T - P - C)
        assert padded.loss_mask[r].tolist() == [0.0] * P + [1.0] * C + [0.0] * (T - P - C)
        # the logprob of a token sits at the token's own column
        torch.testing.assert_close(padded.logprobs[r, P : P + C], torch.tensor(batch.logprobs[r]))
        assert (padded.logprobs[r, :P] == 0).all() and (padded.logprobs[r, P + C :] == 0).all()


def test_same_seed_same_rollout(client):
    params = SamplingParams(max_tokens=5, seed=11)
    a = client.generate(PROMPTS[:2], n=2, params=params)
    b = client.generate(PROMPTS[:2], n=2, params=params)
    assert a.completion_ids == b.completion_ids and a.logprobs == b.logprobs


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_engine_logprobs_match_trainer_recompute(client, hf_model, perturbed, temperature):
    """The tokens' logprobs from the engine (processed = the distribution sampled from: softmax(logits /
    T) without top-k/p) equal the trainer's fp32 recomputation, before and after a weight update."""
    model, _ = hf_model
    params = SamplingParams(max_tokens=12, temperature=temperature, seed=5, ignore_eos=True)
    for round_ in range(2):
        if round_ == 1:
            perturbed(seed=1)
            version = client.update_weights(model)
            assert version == client.weight_version
        batch = client.generate(PROMPTS, n=4, params=params)
        if round_ == 1:
            assert {v for vs in batch.weight_versions for v in vs} == {version}
        padded = batch.padded(pad_token_id=0)
        with torch.no_grad():
            trainer = sequence_logprobs(model, padded.input_ids, padded.attention_mask, temperature)
        mask = padded.loss_mask.bool()
        assert mask.sum() == 12 * 12
        torch.testing.assert_close(trainer[mask], padded.logprobs[mask], atol=2e-5, rtol=0)


def test_update_changes_rollouts_and_bad_update_raises(client, hf_model, perturbed):
    model, _ = hf_model
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    before = client.generate(PROMPTS, n=1, params=params)
    v0 = client.weight_version
    with pytest.raises(ValueError):
        client.update_weights([("model.not_a_param.weight", torch.zeros(3))])
    assert client.weight_version == v0
    assert client.generate(PROMPTS, n=1, params=params).completion_ids == before.completion_ids
    perturbed(seed=2, scale=0.2)
    assert client.update_weights(model, version=v0 + 10) == v0 + 10
    after = client.generate(PROMPTS, n=1, params=params)
    assert after.completion_ids != before.completion_ids


def _output(reasons: list[str | None]) -> RequestOutput:
    samples = [
        CompletionOutput(i, [5, 6, 7][: i + 1], [-0.5] * (i + 1), None, [3] * (i + 1), reason)
        for i, reason in enumerate(reasons)
    ]
    return RequestOutput("r", [1, 2], list(reversed(samples)), finished=True)


def test_from_outputs_masks_aborted_and_optionally_truncated():
    out = _output(["stop", "length", "abort"])
    batch = RolloutBatch.from_outputs([out], n=3)
    assert batch.completion_ids == [[5], [5, 6], [5, 6, 7]]  # sorted by sample index
    assert batch.loss_masks == [[1], [1, 1], [0, 0, 0]]
    assert batch.finish_reasons == ["stop", "length", "abort"]
    assert batch.min_weight_version == 3
    strict = RolloutBatch.from_outputs([out], n=3, mask_truncated=True)
    assert strict.loss_masks == [[1], [0, 0], [0, 0, 0]]
    padded = strict.padded()
    assert padded.loss_mask.sum() == 1
    with pytest.raises(ValueError, match="expected n=2"):
        RolloutBatch.from_outputs([out], n=2)


@pytest.mark.parametrize("bad", [[], [[]], [[1, -2]], "abc", [[1.5]]])
def test_bad_prompts_raise(client, bad):
    with pytest.raises(ValueError):
        client.generate(bad, n=1)


def test_bad_n_raises(client):
    with pytest.raises(ValueError, match="n must be"):
        client.generate(PROMPTS, n=0)
