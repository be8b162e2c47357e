"""The torch paged attention against dense causal attention on random ragged batches."""

from __future__ import annotations

import random

import pytest
import torch

from rollout.kernels import attention_ref
from rollout.kernels.attention_ref import paged_attention_ref, store_kv_ref


def dense(q, k, v, scale, window):
    """q [Lq, H, D] are the last Lq positions of a sequence with k/v [L, Hkv, D]."""
    lq, heads, _ = q.shape
    length, kv_heads, _ = k.shape
    k = k.repeat_interleave(heads // kv_heads, 1)
    v = v.repeat_interleave(heads // kv_heads, 1)
    qpos = torch.arange(length - lq, length)[:, None]
    kpos = torch.arange(length)[None]
    mask = kpos <= qpos
    if window is not None:
        mask &= kpos > qpos - window
    scores = torch.einsum("qhd,khd->hqk", q.double(), k.double()) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v.double())


@pytest.mark.parametrize("seed", range(6))
def test_ragged_batch_matches_dense(seed, monkeypatch):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    heads, kv_heads, dim, bs = rng.choice([(4, 2, 16), (8, 8, 32), (6, 1, 64)]) + (rng.choice([1, 4, 16]),)
    window = rng.choice([None, 5])
    if seed % 2:
        monkeypatch.setattr(
            attention_ref, "_MAX_GATHER_ELEMS", 3 * 40 * kv_heads * dim
        )  # force decode groups
    num_blocks = 400
    k_cache = torch.randn(num_blocks, bs, kv_heads, dim)
    v_cache = torch.randn(num_blocks, bs, kv_heads, dim)
    free = list(range(num_blocks))
    rng.shuffle(free)
    seqs = []  # (full k, full v, q_len, table)
    for _ in range(rng.randint(1, 7)):
        length = rng.randint(1, 40)
        q_len = 1 if rng.random() < 0.5 else rng.randint(1, length)
        table = [free.pop() for _ in range(-(-length // bs))]
        seqs.append((torch.randn(length, kv_heads, dim), torch.randn(length, kv_heads, dim), q_len, table))
    max_blocks = max(len(t) for *_, t in seqs)
    tables = torch.tensor([t + [0] * (max_blocks - len(t)) for *_, t in seqs], dtype=torch.int32)
    # the cached prefix is already in the cache; the new tokens are stored through store_kv_ref
    new_k, new_v, slots, qs, starts = [], [], [], [], [0]
    for k, v, q_len, table in seqs:
        length = k.shape[0]
        for p in range(length):
            slot = table[p // bs] * bs + p % bs
            if p < length - q_len:
                k_cache.view(-1, kv_heads, dim)[slot] = k[p]
                v_cache.view(-1, kv_heads, dim)[slot] = v[p]
            else:
                slots.append(slot)
        new_k.append(k[length - q_len :])
        new_v.append(v[length - q_len :])
        qs.append(torch.randn(q_len, heads, dim))
        starts.append(starts[-1] + q_len)
    store_kv_ref(torch.cat(new_k), torch.cat(new_v), k_cache, v_cache, torch.tensor(slots))
    lens = [k.shape[0] for k, *_ in seqs]
    scale = dim**-0.5
    out = paged_attention_ref(
        torch.cat(qs), k_cache, v_cache, tables, torch.tensor(lens), lens, starts, scale, window
    )
    for i, (k, v, _, _) in enumerate(seqs):
        want = dense(qs[i], k, v, scale, window)
        torch.testing.assert_close(out[starts[i] : starts[i + 1]].double(), want, atol=1e-5, rtol=1e-5)


def test_store_kv_writes_only_given_slots():
    k_cache = torch.zeros(4, 2, 1, 3)
    v_cache = torch.zeros(4, 2, 1, 3)
    key = torch.ones(2, 1, 3)
    store_kv_ref(key, 2 * key, k_cache, v_cache, torch.tensor([5, 0]))
    assert k_cache.view(-1, 3)[[0, 5]].eq(1).all() and k_cache.sum() == 6
    assert v_cache.view(-1, 3)[[0, 5]].eq(2).all() and v_cache.sum() == 12
