"""Shared fixtures: one in-process tiny engine and its HF twin (the trainer's copy, fp32)."""

from __future__ import annotations

import pytest
import torch

from rollout import CacheConfig
from rollout.integrations.grpo import load_trainer_model
from rollout.integrations.rollout_client import RolloutClient


@pytest.fixture(scope="module")
def client():
    c = RolloutClient.local(
        "tiny", device="cpu", dtype="float32", seed=0, cache_config=CacheConfig(num_blocks=256)
    )
    yield c
    c.close()


@pytest.fixture(scope="module")
def hf_model():
    """The trainer's model and tokenizer, loaded from the same tiny checkpoint as the engine."""
    model, tokenizer = load_trainer_model("tiny")
    model.eval()
    return model, tokenizer


@pytest.fixture
def perturbed(hf_model, client):
    """Yield a function that perturbs the HF model in place (a stand-in for an optimizer step); the
    original weights go back into both the model and the engine afterwards."""
    model, _ = hf_model
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def perturb(seed: int, scale: float = 0.05) -> None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * scale)

    yield perturb
    model.load_state_dict(saved)
    client.update_weights(model)
