"""Logits parity with transformers for every family: one flattened prefill over a paged cache, then
the same sequences fed in chunks (prefix, chunk, single tokens) through the cache."""

from __future__ import annotations

import pytest
import torch

from rollout.models import ModelConfig, load_model
from tests.models.paged_kv import SeqChunk, assign_blocks, bind_kv_caches, build_step, prefill_logits
from tests.models.tiny_models import CASES, hf_logits, random_seqs, save_tiny_checkpoint

LENGTHS = [5, 17, 33]
NUM_BLOCKS = 64
ATOL = RTOL = 1e-5


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    """(hf model, our model, block size, sequences) for one case, built once per module."""
    family, overrides, block_size = CASES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    hf = save_tiny_checkpoint(path, family, **overrides)
    model = load_model(ModelConfig.from_pretrained(path, device="cpu"), "cpu")
    seqs = random_seqs(LENGTHS)
    return hf, model, block_size, seqs


def test_config_matches_checkpoint(case):
    hf, model, _, _ = case
    cfg = hf.config
    assert model.spec.num_kv_heads == cfg.num_key_value_heads < cfg.num_attention_heads  # GQA
    assert next(model.parameters()).dtype == torch.float32
    if cfg.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight


def test_prefill_matches_hf(case):
    hf, model, block_size, seqs = case
    ours = prefill_logits(model, seqs, block_size, NUM_BLOCKS)
    ref = torch.cat(hf_logits(hf, seqs))
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=RTOL)


@torch.no_grad()
def test_chunked_decode_matches_hf(case):
    hf, model, block_size, seqs = case
    refs = hf_logits(hf, seqs)
    bind_kv_caches(model, NUM_BLOCKS, block_size, seed=1)
    blocks = assign_blocks([len(s) for s in seqs], block_size, NUM_BLOCKS, seed=1)
    # Per sequence: a prefix chunk, a second chunk, then one token at a time. Sequence 0 is already
    # decoding while the others still prefill, so steps mix decode rows and chunks.
    plans = [[2, 1], [7, 5], [12, 9]]
    for seq, plan in zip(seqs, plans, strict=True):
        plan.extend([1] * (len(seq) - sum(plan)))
    done = [0] * len(seqs)
    for step in range(max(len(p) for p in plans)):
        active = [i for i in range(len(seqs)) if step < len(plans[i])]
        chunks = [SeqChunk(seqs[i], done[i], plans[i][step], blocks[i]) for i in active]
        input_ids, positions, meta = build_step(chunks, block_size)
        logits = model.compute_logits(model(input_ids, positions, meta))
        expected = torch.cat([refs[i][done[i] : done[i] + plans[i][step]] for i in active])
        torch.testing.assert_close(
            logits, expected, atol=ATOL, rtol=RTOL, msg=lambda m, s=step: f"step {s}: {m}"
        )
        for i in active:
            done[i] += plans[i][step]
    assert done == [len(s) for s in seqs]


@torch.no_grad()
def test_forward_cut_at_attention_equals_forward(case):
    """head_piece, then per layer its attention and the next piece (what the piecewise CUDA graphs
    replay around eager attention) compute exactly what forward does."""
    _, model, block_size, seqs = case
    blocks = assign_blocks([len(s) for s in seqs], block_size, NUM_BLOCKS, seed=2)
    chunks = [SeqChunk(s, 0, len(s), b) for s, b in zip(seqs, blocks, strict=True)]
    input_ids, positions, meta = build_step(chunks, block_size)
    bind_kv_caches(model, NUM_BLOCKS, block_size, seed=2)
    whole = model(input_ids, positions, meta)
    bind_kv_caches(model, NUM_BLOCKS, block_size, seed=2)
    d = model.model
    rope = d.rope_inputs(positions)
    qkv, residual = d.head_piece(input_ids)
    for i in range(len(d.layers)):
        attn = d.attention(i, qkv, rope, meta)
        if i + 1 < len(d.layers):
            qkv, residual = d.middle_piece(i + 1, attn, residual)
    cut = d.tail_piece(attn, residual)
    assert len(d.layers) > 1 and torch.equal(cut, whole)
