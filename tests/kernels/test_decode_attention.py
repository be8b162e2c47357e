"""Triton paged decode attention against the torch reference (interpreter on CPU, compiled on CUDA)."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch

from rollout.kernels.decode_attention import (
    DecodeConfig,
    decode_attention,
    decode_attention_qkv,
    default_decode_config,
)
from rollout.kernels.fused_ops import qk_norm_rope_store
from rollout.models.layers.attention import decode_order
from rollout.models.layers.rotary import RopeParameters, RotaryEmbedding
from tests.kernels.paged_case import make_case, poisoned_empty, reference, rel_err

pytestmark = pytest.mark.usefixtures("triton_interpreter")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def dtypes_for(use_dot: bool) -> list[torch.dtype]:
    # Triton 3.9's interpreter multiplies the raw bits of bf16 dot operands: bf16 + tl.dot is
    # checked on the GPU only.
    if DEVICE == "cpu" and use_dot:
        return [torch.float32, torch.float16]
    return [torch.float32, torch.float16, torch.bfloat16]


def run(case, window, config):
    with poisoned_empty():
        return decode_attention(
            case.q, case.k_cache, case.v_cache, case.block_tables, case.seq_lens, case.scale, window, config
        )


CASES = [  # (heads, kv_heads, head_dim, block_size)
    (4, 4, 16, 4),  # MHA
    (4, 2, 32, 1),  # GQA 2, one-token pages
    (8, 2, 16, 16),  # GQA 4
    (8, 1, 64, 8),  # GQA 8 (MQA)
]


@pytest.mark.parametrize("use_dot", [True, False])
@pytest.mark.parametrize("case_idx", range(len(CASES)))
def test_decode_matches_reference(case_idx, use_dot):
    heads, kv_heads, dim, bs = CASES[case_idx]
    for n, dtype in enumerate(dtypes_for(use_dot)):
        seed = 10 * case_idx + n + 100 * use_dot
        rng = random.Random(seed)
        # ragged lengths around page boundaries, a 1-token sequence and a padding row (0)
        lens = [rng.randint(1, 70), 0, 1, bs, bs + 1, rng.randint(1, 40)]
        case = make_case(lens, [1] * len(lens), heads, kv_heads, dim, bs, dtype, DEVICE, seed)
        window = rng.choice([None, 3, 17])
        splits = rng.choice([1, 2, 5])
        out = run(case, window, DecodeConfig(num_splits=splits, block_n=16, use_dot=use_dot))
        err = rel_err(out, reference(case, window))
        assert err < TOL[dtype], (dtype, window, splits, err)
        assert out[1].eq(0).all(), "padding row must be zeros"


def test_more_splits_than_tiles_and_all_padding():
    case = make_case([3, 5, 0], [1, 1, 1], 4, 2, 16, 4, torch.float32, DEVICE, seed=3)
    out = run(case, None, DecodeConfig(num_splits=8, block_n=16))
    assert rel_err(out, reference(case, None)) < 1e-5
    pad = make_case([0, 0], [1, 1], 4, 2, 16, 4, torch.float32, DEVICE, seed=4)
    for splits in (1, 4):
        assert run(pad, None, DecodeConfig(num_splits=splits, block_n=16)).eq(0).all()


@pytest.mark.parametrize("splits", [1, 3])
def test_decode_order_gives_the_same_output(splits):
    """Longest-first start order only reorders the programs: every row's output is unchanged."""
    lens = [9, 0, 33, 1, 17, 33]
    case = make_case(lens, [1] * len(lens), 8, 2, 16, 4, torch.float32, DEVICE, seed=21)
    order = decode_order(np.array(lens)).astype(np.int32)
    assert order.tolist() == [2, 5, 4, 0, 3, 1]  # descending, ties in row order, padding last
    config = DecodeConfig(num_splits=splits, block_n=16)
    plain = run(case, None, config)
    with poisoned_empty():
        ordered = decode_attention(
            case.q, case.k_cache, case.v_cache, case.block_tables, case.seq_lens, case.scale,
            config=config, order=torch.from_numpy(order).to(DEVICE),
        )  # fmt: skip
    assert torch.equal(ordered, plain)
    assert rel_err(ordered, reference(case, None)) < 1e-5


@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim", "splits"), [(8, 2, 16, 5), (4, 4, 32, 3), (8, 1, 64, 9)]
)
def test_fused_merge_matches_the_merge_kernel(heads, kv_heads, dim, splits):
    """With counters the last split program of each (row, KV head) merges the splits: the same
    output as the merge kernel (up to summation order; padding rows zeros), the counters zero
    again, and the next launch on them right too. 9 splits over a 64-wide head at MQA: chunks."""
    lens = [40, 0, 1, 23, 64, 7]
    case = make_case(lens, [1] * len(lens), heads, kv_heads, dim, 4, torch.float32, DEVICE, seed=splits)
    config = DecodeConfig(num_splits=splits, block_n=16)
    counters = torch.zeros(len(lens) * kv_heads + 3, dtype=torch.int32, device=DEVICE)
    order = torch.from_numpy(decode_order(np.array(lens)).astype(np.int32)).to(DEVICE)
    plain = run(case, None, config)
    args = (case.q, case.k_cache, case.v_cache, case.block_tables, case.seq_lens, case.scale)
    for _ in range(2):
        with poisoned_empty():
            fused = decode_attention(*args, config=config, order=order, counters=counters)
        assert rel_err(fused, plain) < 1e-6 and fused[1].eq(0).all()
        assert rel_err(fused, reference(case, None)) < 1e-5
        assert not counters.any()
    with pytest.raises(ValueError, match="counters has 5 entries"):
        decode_attention(*args, config=config, counters=counters[:5])
    with pytest.raises(ValueError, match="counters"):
        decode_attention(*args, config=config, counters=counters.long())


@pytest.mark.parametrize("use_dot", [True, False])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim", "bs", "norm", "splits", "window"),
    [(4, 2, 16, 4, True, 1, None), (8, 2, 32, 1, True, 3, 5), (6, 3, 16, 8, False, 2, None)],
)
def test_decode_attention_qkv_matches_two_launches(heads, kv_heads, dim, bs, norm, splits, window, use_dot):
    """From the packed projection: the same caches and output as qk_norm_rope_store followed by
    decode_attention (the new K/V stored by the program that reads them: within one rounding of
    the norm's summation order), longest first or in row order; padding rows store nothing."""
    lens = [9, 0, 1, bs, 33, bs + 1]
    for n, dtype in enumerate(dtypes_for(use_dot)):
        case = make_case(lens, [1] * len(lens), heads, kv_heads, dim, bs, dtype, DEVICE, seed=n + 7 * splits)
        gen = torch.Generator().manual_seed(n + heads)
        qkv = torch.randn(len(lens), (heads + 2 * kv_heads) * dim, generator=gen).to(dtype).to(DEVICE)
        table = RotaryEmbedding(dim, 64, RopeParameters(rope_type="default", theta=10000.0)).cos_sin_cache
        table = table.to(dtype).to(DEVICE)
        qw = kw = None
        if norm:
            qw = (1 + 0.1 * torch.randn(dim, generator=gen)).to(dtype).to(DEVICE)
            kw = (1 + 0.1 * torch.randn(dim, generator=gen)).to(dtype).to(DEVICE)
        positions = torch.tensor([max(x - 1, 0) for x in lens], device=DEVICE)
        tables = case.block_tables.cpu()
        slots = [int(tables[b, (x - 1) // bs]) * bs + (x - 1) % bs if x else -1 for b, x in enumerate(lens)]
        slots = torch.tensor(slots, device=DEVICE)
        config = DecodeConfig(num_splits=splits, block_n=16, use_dot=use_dot)
        k_two, v_two = case.k_cache.clone(), case.v_cache.clone()
        q = qk_norm_rope_store(qkv, positions, table, heads, kv_heads, dim, k_two, v_two, slots, qw, kw)
        two = decode_attention(q, k_two, v_two, case.block_tables, case.seq_lens, case.scale, window, config)
        order = torch.from_numpy(decode_order(np.array(lens)).astype(np.int32)).to(DEVICE)
        for row_order in (None, order):
            k_one, v_one = case.k_cache.clone(), case.v_cache.clone()
            with poisoned_empty():
                one = decode_attention_qkv(
                    qkv, positions, table, heads, k_one, v_one, case.block_tables, case.seq_lens, slots,
                    case.scale, qw, kw, 1e-6, window, config, order=row_order,
                )  # fmt: skip
            tol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
            assert torch.equal(v_one, v_two)
            live = slots[slots >= 0]
            k_flat, k_two_flat = k_one.flatten(0, 1), k_two.flatten(0, 1)
            torch.testing.assert_close(k_flat[live], k_two_flat[live], atol=tol, rtol=tol)
            others = torch.ones(k_flat.shape[0], dtype=torch.bool, device=DEVICE)
            others[live] = False
            assert torch.equal(k_flat[others], k_two_flat[others])
            assert rel_err(one, two) < 2 * TOL[dtype], (dtype, rel_err(one, two))
            assert one[1].eq(0).all(), "padding row must be zeros"
            # the first K/V tile loaded before the wait, the new position's row replaced: bitwise
            # the same output and caches (single- and multi-tile shares, the new row in either)
            k_pre, v_pre = case.k_cache.clone(), case.v_cache.clone()
            pre = decode_attention_qkv(
                qkv, positions, table, heads, k_pre, v_pre, case.block_tables, case.seq_lens, slots,
                case.scale, qw, kw, 1e-6, window, config, order=row_order, preload=True,
            )  # fmt: skip
            assert torch.equal(pre, one) and torch.equal(k_pre, k_one) and torch.equal(v_pre, v_one)
            # and with the splits merged in the kernel (the last program of each KV head merges)
            counters = torch.zeros(len(lens) * kv_heads, dtype=torch.int32, device=DEVICE)
            k_pre, v_pre = case.k_cache.clone(), case.v_cache.clone()
            merged = decode_attention_qkv(
                qkv, positions, table, heads, k_pre, v_pre, case.block_tables, case.seq_lens, slots,
                case.scale, qw, kw, 1e-6, window, config, order=row_order, counters=counters, preload=True,
            )  # fmt: skip
            assert rel_err(merged, one) < 1e-6 and torch.equal(k_pre, k_one) and not counters.any()
    with pytest.raises(ValueError, match="qkv"):
        decode_attention_qkv(
            qkv[:, :-dim], positions, table, heads, k_one, v_one, case.block_tables, case.seq_lens, slots,
            case.scale,
        )  # fmt: skip
    with pytest.raises(ValueError, match="slot_mapping"):
        decode_attention_qkv(
            qkv, positions, table, heads, k_one, v_one, case.block_tables, case.seq_lens, slots[:2],
            case.scale,
        )  # fmt: skip


def test_default_config_depends_on_shapes_only():
    cfg = default_decode_config(256, 8, torch.device("cpu"))
    assert cfg.num_splits == 1 and cfg.use_dot
    cfg = default_decode_config(1, 8, torch.device("cpu"))
    assert 1 < cfg.num_splits <= 32


def test_decode_rejects_bad_arguments():
    case = make_case([5, 3], [1, 1], 4, 2, 16, 4, torch.float32, DEVICE, seed=5)
    args = (case.q, case.k_cache, case.v_cache, case.block_tables, case.seq_lens, case.scale)
    with pytest.raises(ValueError, match="seq_lens"):
        decode_attention(*args[:4], case.seq_lens.long(), case.scale)
    with pytest.raises(ValueError, match="block_tables"):
        decode_attention(*args[:3], case.block_tables[:1], *args[4:])
    with pytest.raises(ValueError, match="dtype"):
        decode_attention(case.q.half(), *args[1:])
    with pytest.raises(ValueError, match="heads"):
        decode_attention(case.q[:, :3], *args[1:])
    with pytest.raises(ValueError, match="sliding_window"):
        decode_attention(*args, sliding_window=0)
    with pytest.raises(ValueError, match="order"):
        decode_attention(*args, order=torch.tensor([0], dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="order"):
        decode_attention(*args, order=torch.tensor([1, 0], device=DEVICE))
    with pytest.raises(ValueError, match="power of two"):
        bad = case.k_cache[:, :3]
        decode_attention(case.q, bad, bad, *args[3:])


@pytest.mark.gpu
@pytest.mark.parametrize(("group", "head_dim"), [(1, 128), (2, 128), (2, 64), (4, 64), (8, 128)])
def test_decode_gpu_real_shapes(group, head_dim):
    rng = random.Random(group * head_dim)
    lens = [rng.randint(1, 3000) for _ in range(29)] + [0, 0, 4096]
    kv_heads = 8 if group <= 2 else 2
    case = make_case(
        lens, [1] * len(lens), kv_heads * group, kv_heads, head_dim, 16, torch.bfloat16, DEVICE, seed=group
    )
    configs = [(None, None), (1000, None)]  # (window, config): the launcher's defaults
    configs += [(None, DecodeConfig(num_splits=s, use_dot=d)) for s in (1, 7) for d in (True, False)]
    for window, config in configs:
        err = rel_err(run(case, window, config), reference(case, window, torch.float32))
        assert err < 1e-2, (window, config, err)


@pytest.mark.gpu
def test_decode_cuda_graph_replay_with_new_lengths():
    """Captured once, replayed after lengths, tables and queries change (as the decode graphs do)."""
    case = make_case(
        [100, 7, 0, 2000], [1] * 4, 16, 8, 128, 16, torch.bfloat16, DEVICE, seed=7, spare_blocks=64
    )
    tables, seq_lens, q = case.block_tables.clone(), case.seq_lens.clone(), case.q.clone()
    fn = lambda: decode_attention(q, case.k_cache, case.v_cache, tables, seq_lens, case.scale)  # noqa: E731
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    graph.replay()
    assert rel_err(out, reference(case, None, torch.float32)) < 1e-2
    # a new step over the same cache: other lengths (padding moved), reshuffled pages, new queries
    num_blocks, width = case.k_cache.shape[0], tables.shape[1]
    tables.copy_(torch.randint(0, num_blocks, (4, width), device=DEVICE, dtype=torch.int32))
    seq_lens.copy_(torch.tensor([0, 1500, 33, 16 * width], dtype=torch.int32))
    q.copy_(torch.randn_like(q))
    graph.replay()
    new = dataclasses.replace(
        case, q=q, block_tables=tables, seq_lens=seq_lens, seq_lens_host=[0, 1500, 33, 16 * width]
    )
    assert rel_err(out, reference(new, None, torch.float32)) < 1e-2
