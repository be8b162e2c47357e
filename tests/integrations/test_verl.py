"""The verl-style rollout worker: padded tensors in and out, weights from an iterator, release/resume."""

from __future__ import annotations

import asyncio

import torch

from rollout import SamplingParams
from rollout.integrations.rollout_client import sequence_logprobs
from rollout.integrations.verl import RolloutWorker

PAD = 259


def left_pad(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    P = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD] * (P - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def test_generate_sequences_layout_and_logprobs(client, hf_model):
    model, _ = hf_model
    worker = RolloutWorker(client, response_length=7, pad_token_id=PAD, n=2, params=SamplingParams(seed=1))
    prompts = [[1, 2, 3, 4, 5], [9, 8], [40, 41, 42]]
    ids, mask = left_pad(prompts)
    out = worker.generate_sequences({"input_ids": ids, "attention_mask": mask})
    B, P, R = 6, 5, 7
    assert out["prompts"].shape == (B, P) and out["responses"].shape == (B, R)
    assert out["input_ids"].shape == out["attention_mask"].shape == out["position_ids"].shape == (B, P + R)
    assert out["rollout_log_probs"].shape == out["response_mask"].shape == (B, R)
    assert torch.equal(out["prompts"], ids.repeat_interleave(2, dim=0))  # samples of a prompt adjacent
    for r in range(B):
        p = prompts[r // 2]
        k = int(out["response_mask"][r].sum())
        assert 1 <= k <= R and out["response_mask"][r].tolist() == [1] * k + [0] * (R - k)
        assert (out["responses"][r, k:] == PAD).all() and (out["rollout_log_probs"][r, k:] == 0).all()
        assert out["attention_mask"][r].tolist() == [0] * (P - len(p)) + [1] * (len(p) + k) + [0] * (R - k)
        # positions count real tokens: 0 on left padding, then 0.. through the response
        pos = out["position_ids"][r]
        assert pos[P - len(p) : P + k].tolist() == list(range(len(p) + k))
        # the rollout logprobs equal the trainer's on the unpadded sequence
        seq = torch.tensor([p + out["responses"][r, :k].tolist()])
        with torch.no_grad():
            ref = sequence_logprobs(model, seq, torch.ones_like(seq))[0, len(p) :]
        torch.testing.assert_close(ref, out["rollout_log_probs"][r, :k], atol=2e-5, rtol=0)
    assert (out["weight_versions"] == client.weight_version).all()


def test_response_length_is_every_request_max_tokens(client):
    """params without max_tokens (SamplingParams' default is 16) capped responses at 16 tokens of a
    64-token response_length; response_length is max_tokens, as in verl's rollouts."""
    params = SamplingParams(temperature=1.0, ignore_eos=True, seed=2)
    worker = RolloutWorker(client, response_length=40, pad_token_id=PAD, params=params)
    assert worker.params.max_tokens == 40 and worker.params.seed == 2
    ids, mask = left_pad([[1, 2, 3]])
    out = worker.generate_sequences({"input_ids": ids, "attention_mask": mask})
    assert out["response_mask"].sum().item() == 40


def test_greedy_meta_info_and_dataproto_like_input(client):
    worker = RolloutWorker(client, response_length=4, pad_token_id=PAD, n=3)
    ids, mask = left_pad([[5, 6, 7]])

    class FakeDataProto:  # verl's DataProto exposes .batch (tensors) and .meta_info
        batch = {"input_ids": ids, "attention_mask": mask}
        meta_info = {"do_sample": False}

    a = worker.generate_sequences(FakeDataProto())
    b = worker.generate_sequences(FakeDataProto())
    assert a["responses"].shape == (1, 4)  # greedy: one sample
    assert torch.equal(a["responses"], b["responses"])
    many = worker.generate_sequences({"input_ids": ids, "attention_mask": mask, "meta_info": {"n": 5}})
    assert many["responses"].shape == (5, 4)


def test_update_weights_from_iterator_and_release_resume(client, hf_model, perturbed):
    model, _ = hf_model
    worker = RolloutWorker(client, response_length=4, pad_token_id=PAD)
    v0 = client.weight_version
    perturbed(seed=4)
    gen = ((name, p.detach()) for name, p in model.named_parameters())  # a generator, as verl passes
    assert asyncio.run(worker.update_weights(gen)) == v0 + 1
    asyncio.run(worker.release())
    asyncio.run(worker.resume(["weights", "kv_cache"]))
    ids, mask = left_pad([[5, 6, 7]])
    out = worker.generate_sequences({"input_ids": ids, "attention_mask": mask})
    seq = torch.cat([ids[0], out["responses"][0][out["response_mask"][0].bool()]])[None]
    with torch.no_grad():
        ref = sequence_logprobs(model, seq, torch.ones_like(seq))[0, 3:]
    k = int(out["response_mask"][0].sum())
    torch.testing.assert_close(ref, out["rollout_log_probs"][0, :k], atol=2e-5, rtol=0)
