"""Triton extend (prefill) attention against the torch reference: ragged chunks over cached prefixes."""

from __future__ import annotations

import random

import pytest
import torch
from triton.runtime.errors import OutOfResources

from rollout.kernels.prefill_attention import (
    ExtendConfig,
    default_extend_config,
    extend_attention,
    extend_tile_positions,
    extend_tiles,
)
from tests.kernels.paged_case import make_case, poisoned_empty, reference, rel_err

pytestmark = pytest.mark.usefixtures("triton_interpreter")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
# Triton 3.9's interpreter multiplies the raw bits of bf16 dot operands: bf16 runs on the GPU only.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def run(case, window, config=None):
    with poisoned_empty():
        return extend_attention(
            case.q,
            case.k_cache,
            case.v_cache,
            case.block_tables,
            case.seq_lens,
            case.query_start_loc,
            case.max_query_len,
            case.scale,
            window,
            config,
        )


def ragged_batch(rng: random.Random, num_seqs: int, max_len: int) -> tuple[list[int], list[int]]:
    """Full prompts, chunks over a cached prefix (prefix hits) and single decode rows, mixed."""
    lens, q_lens = [], []
    for _ in range(num_seqs):
        length = rng.randint(1, max_len)
        kind = rng.choice(["prompt", "prefix", "decode"])
        q_lens.append(length if kind == "prompt" else 1 if kind == "decode" else rng.randint(1, length))
        lens.append(length)
    return lens, q_lens


CASES = [  # (heads, kv_heads, head_dim, block_size)
    (2, 2, 16, 4),
    (4, 2, 32, 1),
    (8, 2, 16, 16),
    (8, 1, 64, 8),
]


@pytest.mark.parametrize("case_idx", range(len(CASES)))
def test_extend_matches_reference(case_idx):
    heads, kv_heads, dim, bs = CASES[case_idx]
    for n, dtype in enumerate(DTYPES):
        seed = 10 * case_idx + n
        rng = random.Random(seed)
        lens, q_lens = ragged_batch(rng, 4, 45)
        case = make_case(lens, q_lens, heads, kv_heads, dim, bs, dtype, DEVICE, seed)
        window = rng.choice([None, 4, 19])
        config = ExtendConfig(block_m=16, block_n=16, num_warps=4, num_stages=1)
        err = rel_err(run(case, window, config), reference(case, window))
        assert err < TOL[dtype], (dtype, window, lens, q_lens, err)


def test_extend_default_config_and_decode_rows_only():
    case = make_case([30, 1, 12], [30, 1, 5], 4, 2, 16, 4, torch.float32, DEVICE, seed=1)
    assert rel_err(run(case, None), reference(case, None)) < 1e-5
    case = make_case([30, 1, 12], [1, 1, 1], 4, 2, 16, 4, torch.float32, DEVICE, seed=2)
    assert rel_err(run(case, 8), reference(case, 8)) < 1e-5


def test_default_extend_config_packs_power_of_two_groups():
    big = default_extend_config(2048, 128, 2)
    assert big == ExtendConfig(block_m=256, block_n=64, num_warps=8, num_stages=3, pack_gqa=True)
    assert default_extend_config(4096, 128, 4) == big
    assert default_extend_config(4096, 128, 4, torch.float32).block_m == 128  # see the GPU fp32 test
    short = default_extend_config(100, 128, 2)
    assert short.pack_gqa and short.block_m == 128 and short.block_n == 32
    assert default_extend_config(3, 128, 4).block_m == 64  # 16 positions x 4 heads
    for max_q, head_dim, group in ((2048, 128, 3), (2048, 128, 1), (2048, 256, 2)):
        cfg = default_extend_config(max_q, head_dim, group)
        assert not cfg.pack_gqa and cfg.block_m == (64 if head_dim > 128 else 128), (max_q, head_dim, group)


def test_extend_rejects_bad_arguments():
    case = make_case([5, 3], [2, 3], 4, 2, 16, 4, torch.float32, DEVICE, seed=5)
    args = [
        case.q,
        case.k_cache,
        case.v_cache,
        case.block_tables,
        case.seq_lens,
        case.query_start_loc,
        3,
        0.25,
    ]
    for idx, bad, match in [
        (5, case.query_start_loc[:2], "query_start_loc"),
        (4, case.seq_lens.long(), "seq_lens"),
        (3, case.block_tables[:1], "block_tables"),
        (0, case.q.half(), "dtype"),
        (6, -1, "max_query_len"),
    ]:
        with pytest.raises(ValueError, match=match):
            extend_attention(*args[:idx], bad, *args[idx + 1 :])
    for first_seq in (-1, 3):
        with pytest.raises(ValueError, match="first_seq"):
            extend_attention(*args, first_seq=first_seq)


def test_extend_first_seq_computes_only_later_sequences():
    """first_seq=1: sequence 0's rows are left as they were, the others match the reference."""
    case = make_case([9, 30, 12], [4, 30, 5], 4, 2, 16, 4, torch.float32, DEVICE, seed=7)
    want = reference(case, None)
    with poisoned_empty():
        out = extend_attention(
            case.q, case.k_cache, case.v_cache, case.block_tables, case.seq_lens, case.query_start_loc,
            30, case.scale, first_seq=1,
        )  # fmt: skip
    assert rel_err(out[4:], want[4:]) < 1e-5
    assert out[:4].isnan().all()  # never written


@pytest.mark.gpu
@pytest.mark.parametrize(("group", "head_dim"), [(1, 128), (2, 128), (2, 64), (4, 64), (8, 128)])
def test_extend_gpu_real_shapes(group, head_dim):
    rng = random.Random(group + head_dim)
    lens, q_lens = ragged_batch(rng, 12, 1500)
    lens[0] = q_lens[0] = 2048  # one long full prompt
    kv_heads = 8 if group <= 2 else 2
    case = make_case(
        lens, q_lens, kv_heads * group, kv_heads, head_dim, 16, torch.bfloat16, DEVICE, seed=group
    )
    packed = ExtendConfig(pack_gqa=True)
    for window in (None, 300):
        want = reference(case, window, torch.float32)
        for config in (None, packed):
            err = rel_err(run(case, window, config), want)
            assert err < 1e-2, (window, config, err)


_FP32_CONFIGS = [
    ExtendConfig(block_m=128, pack_gqa=True),
    # >= 2048-token chunks in 16-bit dtypes. Not for fp32 models (default_extend_config).
    ExtendConfig(block_m=256, block_n=64, num_warps=8, num_stages=3, pack_gqa=True),
    ExtendConfig(block_m=256, block_n=64, num_warps=8, num_stages=1, pack_gqa=True),
    ExtendConfig(block_m=256, block_n=64, num_warps=4, num_stages=3, pack_gqa=True),
]
# In fp32 at head_dim 128 the 256 x 64 tiles with 3 stages need more shared memory than a Hopper
# block may have (263,424 of 232,448 bytes on the H200 for 4 warps): Triton refuses the launch.
_TOO_BIG = pytest.mark.xfail(raises=OutOfResources, reason="fp32 256 x 64 x 3-stage tiles at head_dim 128")


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "config"),
    [
        pytest.param(
            *shape,
            config,
            marks=_TOO_BIG if i in (1, 3) and shape[2] == 128 else (),
            id=f"d{shape[2]}-config{i}",
        )
        for i, config in enumerate(_FP32_CONFIGS)
        for shape in [(4, 2, 16), (16, 8, 128)]
    ],
)
def test_extend_gpu_fp32_configs_are_exact(heads, kv_heads, head_dim, config):
    """fp32 (``input_precision="ieee"``) on the GPU within fp32 rounding for each tile config, by
    the chunk grid and by a tile list (the 256 x 64, 8-warp config serves 16-bit mixed graphs of
    2,048+ tokens)."""
    rng = random.Random(head_dim)
    lens = [rng.randint(60, 110) for _ in range(40)]
    case = make_case(lens, lens, heads, kv_heads, head_dim, 16, torch.float32, DEVICE, seed=3)
    want = reference(case, None)
    assert rel_err(run(case, None, config), want) < 1e-5
    positions = extend_tile_positions(config, heads, kv_heads)
    tiles = extend_tiles(lens, 0, positions, -(-sum(lens) // positions) + len(lens)).to(DEVICE)
    args = (case.q, case.k_cache, case.v_cache, case.block_tables, case.seq_lens, case.query_start_loc)
    listed = extend_attention(*args, case.max_query_len, case.scale, config=config, tiles=tiles)
    assert rel_err(listed, want) < 1e-5


@pytest.mark.parametrize(("heads", "kv_heads", "block_m"), [(4, 2, 16), (8, 2, 32), (8, 1, 64), (6, 2, 16)])
def test_extend_packed_gqa_matches_reference(heads, kv_heads, block_m):
    """pack_gqa: one program per KV head, its group's query heads in one tile (position-major), on
    ragged chunks, prefix hits, decode rows and windows; a group that is not a power of two (3)
    falls back to one head per program and must match too."""
    rng = random.Random(heads * 10 + block_m)
    for window in (None, 7):
        lens, q_lens = ragged_batch(rng, 5, 50)
        case = make_case(lens, q_lens, heads, kv_heads, 16, 4, torch.float32, DEVICE, seed=block_m)
        config = ExtendConfig(block_m=block_m, block_n=16, num_warps=4, num_stages=1, pack_gqa=True)
        err = rel_err(run(case, window, config), reference(case, window))
        assert err < 1e-5, (heads, kv_heads, window, lens, q_lens, err)
    # first_seq with packing: earlier sequences' rows are never written
    case = make_case([9, 30, 12], [4, 30, 5], heads, kv_heads, 16, 4, torch.float32, DEVICE, seed=3)
    with poisoned_empty():
        out = extend_attention(
            case.q, case.k_cache, case.v_cache, case.block_tables, case.seq_lens, case.query_start_loc,
            30, case.scale, config=ExtendConfig(block_m=block_m, block_n=16, num_stages=1, pack_gqa=True),
            first_seq=1,
        )  # fmt: skip
    assert rel_err(out[4:], reference(case, None)[4:]) < 1e-5
    assert out[:4].isnan().all()


@pytest.mark.parametrize(("heads", "kv_heads", "config"), [
    (4, 2, ExtendConfig(block_m=16, block_n=16)),
    (8, 2, ExtendConfig(block_m=32, block_n=16, pack_gqa=True)),
])  # fmt: skip
def test_extend_tile_list_matches_the_chunk_grid(heads, kv_heads, config):
    """A tile list (the grid a CUDA graph can replay with other lengths), padded past its entries,
    computes exactly what the grid sized from the chunk lengths does, leaving sequences before
    first_seq unwritten."""
    rng = random.Random(11)
    lens, q_lens = ragged_batch(rng, 7, 40)
    q_lens[0] = 1  # a leading decode row, as in a mixed step
    case = make_case(lens, q_lens, heads, kv_heads, 16, 4, torch.float32, DEVICE, seed=11)
    args = (case.q, case.k_cache, case.v_cache, case.block_tables, case.seq_lens, case.query_start_loc)
    positions = extend_tile_positions(config, heads, kv_heads)
    assert positions == (config.block_m // (heads // kv_heads) if config.pack_gqa else config.block_m)
    capacity = -(-sum(q_lens) // positions) + len(q_lens)
    tiles = extend_tiles(q_lens, 1, positions, capacity)
    used = sum(-(-n // positions) for n in q_lens[1:])
    assert (tiles[used:, 0] == -1).all() and (tiles[:used, 0] >= 1).all() and used < capacity
    with poisoned_empty():
        grid = extend_attention(*args, case.max_query_len, case.scale, config=config, first_seq=1)
        listed = extend_attention(
            *args, case.max_query_len, case.scale, config=config, first_seq=1, tiles=tiles.to(DEVICE)
        )
        # only the entries of sequences 1-3: the kernel computes what the list names, nothing else
        partial = extend_attention(
            *args, case.max_query_len, case.scale, config=config,
            tiles=extend_tiles(q_lens[:4], 1, positions, capacity).to(DEVICE),
        )  # fmt: skip
    assert torch.equal(listed[1:], grid[1:])
    assert rel_err(listed[1:], reference(case, None)[1:]) < 1e-5
    assert listed[0].isnan().all()  # sequence 0 is not in the list
    end = sum(q_lens[:4])
    assert torch.equal(partial[1:end], grid[1:end]) and partial[end:].isnan().all()
    # into a given output (a mixed graph's decode rows are already there): the rest is kept
    into = torch.full_like(case.q, 7.0)
    got = extend_attention(
        *args, case.max_query_len, case.scale, config=config, tiles=tiles.to(DEVICE), out=into
    )
    assert got is into and torch.equal(into[1:], grid[1:]) and (into[0] == 7.0).all()
    with pytest.raises(ValueError, match="out must be"):
        extend_attention(*args, case.max_query_len, case.scale, out=into[:, :1])


def test_extend_tiles_rejects_what_does_not_fit():
    assert extend_tiles([3, 20], 0, 8, 5).tolist() == [[0, 0], [1, 2], [1, 1], [1, 0], [-1, 0]]
    with pytest.raises(ValueError, match="do not fit"):
        extend_tiles([3, 20], 0, 8, 3)
    with pytest.raises(ValueError, match="positions"):
        extend_tiles([3], 0, 0, 4)
    case = make_case([5], [5], 2, 2, 16, 4, torch.float32, DEVICE, seed=1)
    args = (case.q, case.k_cache, case.v_cache, case.block_tables, case.seq_lens, case.query_start_loc)
    args = (*args, 5, 1.0)
    tiles = extend_tiles([5], 0, 16, 2).to(DEVICE)
    with pytest.raises(ValueError, match="config"):
        extend_attention(*args, tiles=tiles)
    with pytest.raises(ValueError, match="int32"):
        extend_attention(*args, config=ExtendConfig(block_m=16), tiles=tiles.long())
