"""The weight bytes the decode rooflines count (``model_bytes``): what one decode step reads."""

from __future__ import annotations

import pytest

from rollout import LLM, CacheConfig
from rollout.benchmarks.common import PhaseTimer, model_bytes
from tests.models.tiny_models import save_tiny_checkpoint


@pytest.mark.parametrize("tied", [True, False])
def test_model_bytes_count_the_lm_head_once_and_no_embedding_table(tmp_path, tied):
    save_tiny_checkpoint(tmp_path, "llama", tie_word_embeddings=tied)
    llm = LLM(str(tmp_path), device="cpu", cache_config=CacheConfig(num_blocks=16))
    model = llm.engine.runner.model
    weights, kv_per_token = model_bytes(llm)
    nbytes = {name: p.numel() * p.element_size() for name, p in model.named_parameters()}
    head = model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    # every layer and norm, plus the vocabulary matrix the LM head reads; an untied input table is
    # only gathered by rows (it counted whole, ~7% of an 8B model's floor)
    layers = sum(n for name, n in nbytes.items() if "embed_tokens" not in name and "lm_head" not in name)
    assert weights == layers + head
    mc = llm.engine.model_config
    assert kv_per_token == 2 * mc.num_layers * mc.num_kv_heads * mc.head_dim * mc.dtype.itemsize


class _Engine:
    def step(self) -> int:
        return 1


def test_phase_timer_timing_puts_back_methods_and_functions():
    """Inside: the calls are timed by phase; after: an instance has no attribute of its own left and
    a namespace (a module) has its function back, also when one attribute is wrapped twice."""
    import types

    engine = _Engine()
    module = types.SimpleNamespace(sample=lambda: 2)
    sample = module.sample
    timer = PhaseTimer()
    with timer.timing([(engine, "step", "step"), (module, "sample", "a"), (module, "sample", "b")]):
        assert engine.step() == 1 and module.sample() == 2 and "step" in vars(engine)
    assert "step" not in vars(engine) and module.sample is sample
    assert set(timer.seconds) == {"step", "a", "b"} and min(timer.seconds.values()) > 0
    with pytest.raises(ZeroDivisionError), timer.timing([(module, "sample", "c")]):
        module.sample()
        raise ZeroDivisionError  # an error inside still restores
    assert module.sample is sample
