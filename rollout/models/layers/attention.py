"""Attention layer over the paged KV cache, and the per-step metadata the model runner hands it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from rollout.kernels.attention_ref import paged_attention_ref, store_kv_ref

if TYPE_CHECKING:
    from rollout.kernels.prefill_attention import ExtendConfig


@dataclass
class AttentionMetadata:
    """Where this step's tokens sit in the paged KV cache. Built by the model runner each step and
    passed explicitly to ``model.forward`` (no global context). Sequences are in batch order."""

    # [num_tokens] int64: flat cache slot each new token's K/V goes to; -1 (graph padding) is skipped by
    # the triton store, while the torch path takes only valid slots
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32: block ids of each sequence, padded
    seq_lens: torch.Tensor  # [num_seqs] int32: KV length of each sequence after this step
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32: cumulative query lengths (row offsets)
    seq_lens_host: list[int]  # seq_lens on the host (loop bounds for the torch path)
    query_start_loc_host: list[int]  # query_start_loc on the host
    max_seq_len: int  # max(seq_lens_host)
    max_query_len: int  # longest query chunk this step (1 for a pure decode step)
    # Leading sequences with exactly one query row. In a mixed step (decodes + prompt chunks) the
    # triton backend runs them through the decode kernel (K/V read once per GQA group, split KV)
    # and only the rest through the extend kernel, whose query tiles would be 1/16-1/128 used.
    num_decodes: int = 0
    # int32 [num_decodes, or num_seqs in a decode step]: the decode rows by descending KV length,
    # the order the decode kernel starts them in (``decode_order``); None: row order
    decode_order: torch.Tensor | None = None
    # A mixed step in one CUDA graph (``rollout.mixed_graphs``): grids that do not depend on the
    # step. The decode kernel runs over the leading ``len(decode_seq_lens)`` rows (int32; 0 past
    # the step's decodes: those rows are written with zeros, then by the extend kernel) in
    # ``decode_order`` (a permutation of those rows), and the extend kernel over ``extend_tiles``
    # (int32 [capacity, 2], see ``kernels.prefill_attention.extend_tiles``) with ``extend_config``.
    decode_seq_lens: torch.Tensor | None = None
    extend_tiles: torch.Tensor | None = None
    extend_config: ExtendConfig | None = None
    # int32 zeros, at least num_seqs * num_kv_heads (the runner's, kept across steps): split decode
    # launches merge their splits in the kernel (``decode_attention``'s ``counters``); None: a
    # merge kernel follows
    split_counters: torch.Tensor | None = None


def decode_order(seq_lens: np.ndarray) -> np.ndarray:
    """The rows of a decode batch by descending KV length, ties in row order. The decode kernel
    starts sequences in this order, so a ragged batch's launch ends on its shortest sequences
    (longest-processing-time-first) instead of on a long one that happened to come last."""
    return np.argsort(-seq_lens, kind="stable")


class Attention(nn.Module):
    """Stores this step's K/V into the layer's cache, then attends causally over the whole sequence.

    The model runner binds ``k_cache``/``v_cache`` ([num_blocks, block_size, num_kv_heads,
    head_dim]) before the first forward; they are plain attributes, not buffers, so they stay out of
    ``state_dict`` and weight loading.

    ``backend`` picks the kernels: ``"torch"`` (default; the CPU path, reads the host-side lengths)
    or ``"triton"`` (CUDA; reads only device tensors, so decode steps can be graph-captured). The
    model runner sets it per layer.
    """

    BACKENDS = ("torch", "triton")

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        sliding_window: int | None = None,
    ) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None
        self.backend = "torch"

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """q: [T, Hq*D], k/v: [T, Hkv*D] -> [T, Hq*D]."""
        assert self.k_cache is not None and self.v_cache is not None, "KV cache not bound"
        num_tokens = q.shape[0]
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.backend == "triton":
            out = self._forward_triton(q, k, v, meta)
            return out.view(num_tokens, self.num_heads * self.head_dim)
        if self.backend != "torch":
            raise ValueError(f"unknown attention backend {self.backend!r}, expected one of {self.BACKENDS}")
        store_kv_ref(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        out = paged_attention_ref(
            q,
            self.k_cache,
            self.v_cache,
            meta.block_tables,
            meta.seq_lens,
            meta.seq_lens_host,
            meta.query_start_loc_host,
            self.scale,
            self.sliding_window,
        )
        return out.view(num_tokens, self.num_heads * self.head_dim)

    def _forward_triton(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        # Imported here so that CPU-only users of the torch path never import Triton.
        from rollout.kernels.store_kv import store_kv

        assert self.k_cache is not None and self.v_cache is not None
        store_kv(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        return self._attend_triton(q, meta)

    def attend(self, q: torch.Tensor, meta: AttentionMetadata, pdl: bool = False) -> torch.Tensor:
        """Attention for this step when its K/V are already in the cache (a fused kernel stored them,
        e.g. ``qk_norm_rope_store``): q [T, Hq*D] -> [T, Hq*D]. Triton backend only. ``pdl``: a
        decode step's kernels launch as programmatic dependents (``decode_attention``'s)."""
        if self.backend != "triton":
            raise ValueError(f"attend() needs the triton backend, this layer uses {self.backend!r}")
        num_tokens = q.shape[0]
        out = self._attend_triton(q.view(num_tokens, self.num_heads, self.head_dim), meta, pdl)
        return out.view(num_tokens, self.num_heads * self.head_dim)

    def decode_qkv(
        self,
        qkv: torch.Tensor,
        positions: torch.Tensor,
        cos_sin_cache: torch.Tensor,
        q_weight: torch.Tensor | None,
        k_weight: torch.Tensor | None,
        eps: float,
        meta: AttentionMetadata,
        pdl: bool = False,
        preload: bool = False,
    ) -> torch.Tensor:
        """A decode step's attention from the packed projection [B, (Hq + 2 Hkv) * D]: q/k norm,
        RoPE, the K/V store and the attention in one launch (``decode_attention_qkv``, whose
        ``pdl`` and ``preload`` these are) -> [B, Hq, D].
        Triton backend; every row one query (``meta.max_query_len == 1``), no mixed-step graph."""
        from rollout.kernels.decode_attention import decode_attention_qkv

        if self.backend != "triton" or meta.max_query_len != 1 or meta.extend_tiles is not None:
            raise ValueError("decode_qkv() needs the triton backend and a step of one query row per sequence")
        assert self.k_cache is not None and self.v_cache is not None, "KV cache not bound"
        return decode_attention_qkv(
            qkv,
            positions,
            cos_sin_cache,
            self.num_heads,
            self.k_cache,
            self.v_cache,
            meta.block_tables,
            meta.seq_lens,
            meta.slot_mapping,
            self.scale,
            q_weight,
            k_weight,
            eps,
            self.sliding_window,
            order=meta.decode_order,
            counters=meta.split_counters,
            pdl=pdl,
            preload=preload,
        )

    def _attend_triton(self, q: torch.Tensor, meta: AttentionMetadata, pdl: bool = False) -> torch.Tensor:
        assert self.k_cache is not None and self.v_cache is not None, "KV cache not bound"
        if meta.extend_tiles is not None:  # a mixed step's graph: decode rows first, then the tiles
            assert meta.decode_seq_lens is not None
            out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
            rows = meta.decode_seq_lens.shape[0]
            tables = meta.block_tables[:rows]
            self._decode(q[:rows], tables, meta.decode_seq_lens, meta.decode_order, meta, out[:rows])
            return self._extend(q, meta, config=meta.extend_config, tiles=meta.extend_tiles, out=out)
        if meta.max_query_len == 1:  # one query row per sequence, rows in batch order
            return self._decode(q, meta.block_tables, meta.seq_lens, meta.decode_order, meta, pdl=pdl)
        nd = meta.num_decodes if meta.num_decodes < meta.seq_lens.shape[0] else 0
        # whole tensors plus an offset, not slices: a sliced pointer's alignment would make Triton
        # compile new specializations mid-run
        out = self._extend(q, meta, first_seq=nd)
        if nd:  # rows 0..nd-1: one query each, in the decode kernel
            order = None if meta.decode_order is None else meta.decode_order[:nd]
            self._decode(q[:nd], meta.block_tables[:nd], meta.seq_lens[:nd], order, meta, out[:nd])
        return out

    def _decode(
        self,
        q: torch.Tensor,
        block_tables: torch.Tensor,
        seq_lens: torch.Tensor,
        order: torch.Tensor | None,
        meta: AttentionMetadata,
        out: torch.Tensor | None = None,
        pdl: bool = False,
    ) -> torch.Tensor:
        """The decode kernel on these rows (one query each) of this layer's cache."""
        from rollout.kernels.decode_attention import decode_attention

        return decode_attention(
            q,
            self.k_cache,
            self.v_cache,
            block_tables,
            seq_lens,
            self.scale,
            self.sliding_window,
            out=out,
            order=order,
            counters=meta.split_counters,
            pdl=pdl,
        )

    def _extend(self, q: torch.Tensor, meta: AttentionMetadata, **launch) -> torch.Tensor:
        """The extend kernel on the step's query chunks (``launch``: its keyword arguments)."""
        from rollout.kernels.prefill_attention import extend_attention

        return extend_attention(
            q,
            self.k_cache,
            self.v_cache,
            meta.block_tables,
            meta.seq_lens,
            meta.query_start_loc,
            meta.max_query_len,
            self.scale,
            self.sliding_window,
            **launch,
        )
