"""Test helper: random paged-attention problems, a float64 reference and output poisoning."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from rollout.kernels.attention_ref import paged_attention_ref


@dataclass
class PagedCase:
    """A batch of sequences whose last q_len positions are queries; every K/V is already cached."""

    q: torch.Tensor  # [T, Hq, D]
    k_cache: torch.Tensor  # [num_blocks, block_size, Hkv, D], noise in every unused slot
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with random (valid) block ids
    seq_lens: torch.Tensor  # [B] int32
    query_start_loc: torch.Tensor  # [B + 1] int32
    seq_lens_host: list[int]
    query_start_host: list[int]
    scale: float

    @property
    def max_query_len(self) -> int:
        starts = self.query_start_host
        return max(starts[i + 1] - starts[i] for i in range(len(starts) - 1))


def make_case(
    seq_lens: list[int],
    q_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    device: str | torch.device = "cpu",
    seed: int = 0,
    spare_blocks: int = 4,
) -> PagedCase:
    """Random case; a sequence with seq_len 0 is a padding row (q_len must then be 1: decode)."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    need = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(need) + spare_blocks
    perm = list(range(num_blocks))
    rng.shuffle(perm)
    width = max(max(need), 1)
    tables, offset = [], 0
    for n in need:
        # padding entries point at random blocks: a kernel reading past seq_len reads noise
        tables.append(perm[offset : offset + n] + [rng.randrange(num_blocks) for _ in range(width - n)])
        offset += n
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    starts = [0]
    for q_len in q_lens:
        starts.append(starts[-1] + q_len)
    q = torch.randn(starts[-1], num_heads, head_dim, generator=gen).to(dtype)
    return PagedCase(
        q=q.to(device),
        k_cache=k_cache.to(device),
        v_cache=v_cache.to(device),
        block_tables=torch.tensor(tables, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens_host=list(seq_lens),
        query_start_host=starts,
        scale=head_dim**-0.5,
    )


def reference(
    case: PagedCase, sliding_window: int | None, ref_dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """paged_attention_ref on upcast inputs; padding rows (seq_len 0) are zeros."""
    live = [i for i, n in enumerate(case.seq_lens_host) if n > 0]
    out = torch.zeros(case.q.shape, dtype=ref_dtype, device=case.q.device)
    if not live:
        return out
    rows = [r for i in live for r in range(case.query_start_host[i], case.query_start_host[i + 1])]
    starts = [0]
    for i in live:
        starts.append(starts[-1] + case.query_start_host[i + 1] - case.query_start_host[i])
    idx = torch.tensor(live, device=case.q.device)
    rows_t = torch.tensor(rows, device=case.q.device)
    out[rows_t] = paged_attention_ref(
        case.q[rows_t].to(ref_dtype),
        case.k_cache.to(ref_dtype),
        case.v_cache.to(ref_dtype),
        case.block_tables[idx],
        case.seq_lens[idx],
        [case.seq_lens_host[i] for i in live],
        starts,
        case.scale,
        sliding_window,
    )
    return out


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere fails any tolerance."""
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("nan")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


@contextlib.contextmanager
def poisoned_empty() -> Iterator[None]:
    """Make ``torch.empty`` return NaN-filled float tensors, so unwritten outputs fail the check."""
    real = torch.empty

    def empty(*args, **kwargs):
        t = real(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    torch.empty = empty
    try:
        yield
    finally:
        torch.empty = real
