"""The Attention layer's "triton" backend against its "torch" backend on the same step."""

from __future__ import annotations

import pytest
import torch

from rollout.models.layers.attention import Attention, AttentionMetadata
from tests.kernels.paged_case import make_case, rel_err

pytestmark = pytest.mark.usefixtures("triton_interpreter")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def step(
    seq_lens: list[int], q_lens: list[int], heads: int, kv_heads: int, dim: int, bs: int, dtype, seed: int
):
    """A case plus this step's new K/V rows and the metadata the runner would build for it."""
    case = make_case(seq_lens, q_lens, heads, kv_heads, dim, bs, dtype, DEVICE, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    num_tokens = case.q.shape[0]
    k = torch.randn(num_tokens, kv_heads * dim, generator=gen).to(dtype).to(DEVICE)
    v = torch.randn(num_tokens, kv_heads * dim, generator=gen).to(dtype).to(DEVICE)
    tables = case.block_tables.tolist()
    slots = []
    for i, (n, q_len) in enumerate(zip(seq_lens, q_lens, strict=True)):
        if n == 0:  # padding row of a decode graph
            slots.append(-1)
            continue
        slots += [tables[i][p // bs] * bs + p % bs for p in range(n - q_len, n)]
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=DEVICE),
        block_tables=case.block_tables,
        seq_lens=case.seq_lens,
        query_start_loc=case.query_start_loc,
        seq_lens_host=list(seq_lens),
        query_start_loc_host=case.query_start_host,
        max_seq_len=max(seq_lens),
        max_query_len=max(q_lens),
        num_decodes=next((i for i, n in enumerate(q_lens) if n != 1), len(q_lens)),
    )
    return case, k, v, meta


def run(backend: str, case, k, v, meta, window):
    heads, dim = case.q.shape[1:]
    layer = Attention(heads, case.k_cache.shape[2], dim, case.scale, window)
    layer.backend = backend
    layer.k_cache, layer.v_cache = case.k_cache.clone(), case.v_cache.clone()
    out = layer(case.q.reshape(case.q.shape[0], -1), k, v, meta)
    return out, layer.k_cache, layer.v_cache


@pytest.mark.parametrize(
    ("seq_lens", "q_lens", "window"),
    [
        ([20, 1, 33, 9], [20, 1, 6, 1], None),  # mixed: prompt, decode, prefix hit -> extend kernel
        ([20, 1, 33, 9], [1, 1, 1, 1], 7),  # pure decode -> decode kernel
        # leading decode rows of a mixed step -> decode kernel for them, extend kernel for the rest
        ([12, 7, 40, 33, 5], [1, 1, 20, 6, 1], None),
        ([12, 7, 40, 33], [1, 1, 20, 1], 9),
    ],
)
def test_triton_backend_matches_torch(seq_lens, q_lens, window):
    case, k, v, meta = step(seq_lens, q_lens, 8, 2, 16, 4, torch.float32, seed=len(q_lens) + sum(q_lens))
    want, k_want, v_want = run("torch", case, k, v, meta, window)
    got, k_got, v_got = run("triton", case, k, v, meta, window)
    assert torch.equal(k_got, k_want) and torch.equal(v_got, v_want)
    assert rel_err(got, want) < 1e-5


def test_triton_decode_with_padding_rows():
    case, k, v, meta = step([12, 0, 5, 0], [1, 1, 1, 1], 4, 4, 16, 4, torch.float32, seed=3)
    got, k_got, _ = run("triton", case, k, v, meta, None)
    assert got[[1, 3]].eq(0).all()
    live = [0, 2]
    sub = AttentionMetadata(
        slot_mapping=meta.slot_mapping[live],
        block_tables=meta.block_tables[live],
        seq_lens=meta.seq_lens[live],
        query_start_loc=torch.arange(3, dtype=torch.int32, device=DEVICE),
        seq_lens_host=[12, 5],
        query_start_loc_host=[0, 1, 2],
        max_seq_len=12,
        max_query_len=1,
    )
    sub_case = case.__class__(**{**case.__dict__, "q": case.q[live]})
    want, k_want, _ = run("torch", sub_case, k[live], v[live], sub, None)
    assert torch.equal(k_got, k_want)  # the padding rows stored nothing
    assert rel_err(got[live], want) < 1e-5


def test_unknown_backend_is_rejected():
    case, k, v, meta = step([3], [3], 2, 2, 16, 4, torch.float32, seed=0)
    with pytest.raises(ValueError, match="backend"):
        run("cuda", case, k, v, meta, None)
