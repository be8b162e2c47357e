"""Triton scatter of this step's K/V rows into the paged cache (reference: ``attention_ref.store_kv_ref``)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rollout.kernels._checks import check_kv_cache, check_rows, check_slots


@triton.jit
def _store_kv_kernel(
    key_ptr,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_kc_block,
    stride_kc_slot,
    stride_kc_head,
    stride_vc_block,
    stride_vc_slot,
    stride_vc_head,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot < 0:  # padding row (CUDA-graph padding uses -1): nothing to store
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    mask = (h[:, None] < NUM_HEADS) & (d[None, :] < HEAD_DIM)
    src_k = key_ptr + token.to(tl.int64) * stride_kt + h[:, None] * stride_kh + d[None, :]
    src_v = value_ptr + token.to(tl.int64) * stride_vt + h[:, None] * stride_vh + d[None, :]
    k = tl.load(src_k, mask=mask)
    v = tl.load(src_v, mask=mask)
    dst_k = k_cache_ptr + block * stride_kc_block + offset * stride_kc_slot + h[:, None] * stride_kc_head
    dst_v = v_cache_ptr + block * stride_vc_block + offset * stride_vc_slot + h[:, None] * stride_vc_head
    tl.store(dst_k + d[None, :], k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(dst_v + d[None, :], v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Scatter ``key``/``value`` [num_tokens, num_kv_heads, head_dim] into the paged caches.

    Row t goes to flat slot ``slot_mapping[t]`` (``block * block_size + offset``); a negative slot
    marks a padding row and is skipped. Rows are cast to the cache dtype. Slots are not checked
    against the cache size (that would need a device sync); out-of-range slots are the caller's bug.
    """
    _, _, num_kv_heads, head_dim = check_kv_cache(k_cache, v_cache)
    check_rows("key", key, num_kv_heads, head_dim, k_cache.device)
    check_rows("value", value, num_kv_heads, head_dim, k_cache.device)
    num_tokens = key.shape[0]
    if value.shape[0] != num_tokens:
        raise ValueError(f"value has {value.shape[0]} rows, key {num_tokens}")
    check_slots(slot_mapping, num_tokens, k_cache.device)
    if num_tokens == 0:
        return
    _store_kv_kernel[(num_tokens,)](
        key,
        value,
        k_cache,
        v_cache,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        *k_cache.stride()[:3],
        *v_cache.stride()[:3],
        NUM_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_SIZE=k_cache.shape[1],
        num_warps=4,
    )
