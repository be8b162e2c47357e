"""Triton store_kv against store_kv_ref: scatter by flat slot, padding rows (slot -1) skipped."""

from __future__ import annotations

import pytest
import torch

from rollout.kernels.attention_ref import store_kv_ref
from rollout.kernels.store_kv import store_kv

pytestmark = pytest.mark.usefixtures("triton_interpreter")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize(
    ("kv_heads", "head_dim", "block_size", "src_dtype", "cache_dtype"),
    [
        (2, 16, 4, torch.float32, torch.float32),
        (1, 32, 1, torch.bfloat16, torch.bfloat16),
        (3, 64, 16, torch.float16, torch.float16),
        (8, 128, 16, torch.float32, torch.bfloat16),  # cast on store, like the reference
    ],
)
def test_store_kv_matches_reference(kv_heads, head_dim, block_size, src_dtype, cache_dtype):
    gen = torch.Generator().manual_seed(head_dim)
    num_blocks, num_tokens = 16, 11
    # K and V as strided views of one fused qkv-like buffer, as the model produces them
    fused = torch.randn(num_tokens, 3 * kv_heads, head_dim, generator=gen).to(src_dtype).to(DEVICE)
    key, value = fused[:, kv_heads : 2 * kv_heads], fused[:, 2 * kv_heads :]
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[[2, 7]] = -1  # padding rows
    slots = slots.to(DEVICE)
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(cache_dtype).to(DEVICE)
    v_cache = torch.randn(shape, generator=gen).to(cache_dtype).to(DEVICE)
    k_want, v_want = k_cache.clone(), v_cache.clone()
    keep = slots >= 0
    store_kv_ref(key[keep], value[keep], k_want, v_want, slots[keep])
    store_kv(key, value, k_cache, v_cache, slots)
    if src_dtype == cache_dtype or DEVICE == "cuda":
        assert torch.equal(k_cache, k_want) and torch.equal(v_cache, v_want)
    else:  # Triton 3.9's interpreter truncates fp32 -> bf16 (the GPU rounds to nearest even)
        torch.testing.assert_close(k_cache, k_want, atol=0, rtol=2**-7)
        torch.testing.assert_close(v_cache, v_want, atol=0, rtol=2**-7)


def test_store_kv_into_head_major_pages():
    """The kernel writes through the cache's strides: a cache laid out [blocks, kv_heads,
    block_size, head_dim], passed as its [blocks, block_size, kv_heads, head_dim] view, gets the
    same values as a contiguous one."""
    gen = torch.Generator().manual_seed(5)
    num_blocks, block_size, kv_heads, head_dim, num_tokens = 6, 4, 2, 16, 9
    key = torch.randn(num_tokens, kv_heads, head_dim, generator=gen).to(DEVICE)
    value = torch.randn(num_tokens, kv_heads, head_dim, generator=gen).to(DEVICE)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens].to(DEVICE)
    want_k = torch.zeros(num_blocks, block_size, kv_heads, head_dim, device=DEVICE)
    want_v = torch.zeros_like(want_k)
    store_kv_ref(key, value, want_k, want_v, slots)
    k_cache = torch.zeros(num_blocks, kv_heads, block_size, head_dim, device=DEVICE).transpose(1, 2)
    v_cache = torch.zeros(num_blocks, kv_heads, block_size, head_dim, device=DEVICE).transpose(1, 2)
    store_kv(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)


def test_store_kv_int32_slots_and_empty():
    k_cache = torch.zeros(4, 2, 1, 16, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    key = torch.ones(2, 1, 16, device=DEVICE)
    store_kv(key, 2 * key, k_cache, v_cache, torch.tensor([5, -1], dtype=torch.int32, device=DEVICE))
    assert k_cache.view(-1, 16)[5].eq(1).all() and k_cache.sum() == 16 and v_cache.sum() == 32
    store_kv(key[:0], key[:0], k_cache, v_cache, torch.zeros(0, dtype=torch.long, device=DEVICE))


def test_store_kv_rejects_bad_arguments():
    k_cache = torch.zeros(4, 2, 2, 16, device=DEVICE)
    key = torch.ones(3, 2, 16, device=DEVICE)
    slots = torch.arange(3, device=DEVICE)
    with pytest.raises(ValueError, match="key"):
        store_kv(key[:, :1], key, k_cache, k_cache.clone(), slots)
    with pytest.raises(ValueError, match="slot_mapping"):
        store_kv(key, key, k_cache, k_cache.clone(), slots[:2])
    with pytest.raises(ValueError, match="slot_mapping"):
        store_kv(key, key, k_cache, k_cache.clone(), slots.float())
    with pytest.raises(ValueError, match="slot_mapping"):  # the kernel reads row t's slot at t
        store_kv(key, key, k_cache, k_cache.clone(), torch.arange(6, device=DEVICE)[::2])
    with pytest.raises(ValueError, match="v_cache"):
        store_kv(key, key, k_cache, k_cache[:2].clone(), slots)
    with pytest.raises(ValueError, match="contiguous"):
        store_kv(key.transpose(0, 2).contiguous().transpose(0, 2), key, k_cache, k_cache.clone(), slots)
