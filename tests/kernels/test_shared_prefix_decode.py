"""Shared-prefix decode (GRPO's n samples of a prompt read its KV once per group) against the torch
reference: groups built from block tables that share leading blocks, singletons, padded member
slots, GQA groups of 1-4."""

from __future__ import annotations

import random

import pytest
import torch

from rollout.kernels.attention_ref import paged_attention_ref
from rollout.kernels.shared_prefix_decode import shared_prefix_decode, shared_prefix_groups

pytestmark = pytest.mark.usefixtures("triton_interpreter")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def grpo_batch(
    rng: random.Random, prompts: int, samples: int, block_size: int, max_prompt: int, max_out: int
):
    """Block tables where each prompt's samples share its full prompt blocks, then own blocks."""
    tables, lens, next_block = [], [], 0
    for _ in range(prompts):
        prompt = rng.randint(1, max_prompt)
        shared = prompt // block_size  # full prompt blocks are shared; a partial one is each sample's
        prompt_blocks = list(range(next_block, next_block + shared))
        next_block += shared
        for _ in range(rng.randint(1, samples)):
            length = prompt + rng.randint(1, max_out)
            own = -(-length // block_size) - shared
            tables.append(prompt_blocks + list(range(next_block, next_block + own)))
            next_block += own
            lens.append(length)
    order = list(range(len(lens)))
    rng.shuffle(order)  # a step's rows are not grouped by prompt
    return [tables[i] for i in order], [lens[i] for i in order], next_block


@pytest.mark.parametrize(("heads", "kv_heads", "dim", "block_size", "max_members"), [
    (4, 2, 16, 4, 8), (2, 2, 32, 8, 3), (8, 2, 16, 16, 4), (4, 1, 16, 4, 2),
])  # fmt: skip
def test_shared_prefix_decode_matches_the_reference(heads, kv_heads, dim, block_size, max_members):
    rng = random.Random(heads * 100 + block_size)
    torch.manual_seed(block_size)
    tables, lens, num_blocks = grpo_batch(
        rng, prompts=4, samples=5, block_size=block_size, max_prompt=40, max_out=20
    )
    members, prefix_lens, starts = shared_prefix_groups(tables, lens, block_size, max_members)
    assert (prefix_lens % block_size == 0).all() and prefix_lens.max() > 0  # something is shared
    assert sorted(members[members >= 0].tolist()) == list(range(len(lens)))  # every row once
    width = max(map(len, tables))
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    k_cache = torch.randn(num_blocks + 1, block_size, kv_heads, dim)
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(len(lens), heads, dim)
    args = [x.to(DEVICE) for x in (q, k_cache, v_cache, padded, torch.tensor(lens, dtype=torch.int32))]
    got = shared_prefix_decode(
        *args,
        torch.from_numpy(members).to(DEVICE),
        torch.from_numpy(prefix_lens).to(DEVICE),
        torch.from_numpy(starts).to(DEVICE),
        scale=dim**-0.5,
        block_n=16,
    )
    want = paged_attention_ref(
        q, k_cache, v_cache, padded, torch.tensor(lens), lens, list(range(len(lens) + 1)), dim**-0.5
    )
    torch.testing.assert_close(got.cpu(), want, atol=1e-5, rtol=1e-5)


def test_shared_prefix_groups_share_only_common_full_blocks():
    bs = 4
    tables = [[7, 8, 9, 20], [7, 8, 9, 21], [7, 8, 30], [5, 6], [7, 8, 9, 22]]
    lens = [14, 13, 10, 6, 9]  # row 4's last position (8) is in block 2: it shares blocks 0-1 only
    members, prefix, starts = shared_prefix_groups(tables, lens, bs, max_members=8)
    assert members.tolist() == [[0, 1, 2, 4, -1, -1, -1, -1], [3, -1, -1, -1, -1, -1, -1, -1]]
    assert prefix.tolist() == [8, 0]  # blocks 7 and 8 (row 2 leaves 9 out); a lone row shares nothing
    assert starts.tolist() == [8, 8, 8, 0, 8]
    members, prefix, starts = shared_prefix_groups(tables, lens, bs, max_members=2)
    assert members.tolist() == [[0, 1], [2, 4], [3, -1]]
    assert prefix.tolist() == [12, 8, 0] and starts.tolist() == [12, 12, 8, 0, 8]
    with pytest.raises(ValueError, match="max_members"):
        shared_prefix_groups(tables, lens, bs, max_members=0)


def test_shared_prefix_decode_rejects_bad_arguments():
    from rollout import RunnerConfig

    with pytest.raises(ValueError, match="shared_prefix_members"):
        RunnerConfig(shared_prefix_members=-1)
    k_cache = torch.zeros(4, 4, 2, 16)
    q = torch.zeros(2, 4, 16)
    tables = torch.zeros(2, 2, dtype=torch.int32)
    lens = torch.tensor([5, 6], dtype=torch.int32)
    members = torch.tensor([[0, 1]], dtype=torch.int32)
    prefix, starts = torch.tensor([4], dtype=torch.int32), torch.tensor([4, 4], dtype=torch.int32)
    strided = torch.tensor([[0, -1, 9], [1, -1, 9]], dtype=torch.int32)[:, :2]  # rows 3 apart
    with pytest.raises(ValueError, match="members must be contiguous"):
        shared_prefix_decode(q, k_cache, k_cache, tables, lens, strided, prefix.repeat(2), starts, 0.1)
    with pytest.raises(ValueError, match="prefix_lens must have shape"):
        shared_prefix_decode(q, k_cache, k_cache, tables, lens, members, starts, starts, 0.1)
    with pytest.raises(ValueError, match="block_n"):
        shared_prefix_decode(q, k_cache, k_cache, tables, lens, members, prefix, starts, 0.1, block_n=24)
