"""DecodeGraphs' two-halves forward (RunnerConfig.two_stream_decode_min_batch) without a GPU: the
halves run in turn on the CPU over the same static buffers, per-half metadata and per-half decode
orders the graphs use on CUDA, and must give the one-stream forward's hidden states and logits,
with the merge kernel and with the in-kernel merge (whose counters the halves must not share)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from rollout import LLM, CacheConfig, RunnerConfig
from rollout.cuda_graphs import DecodeGraphs
from rollout.models.layers.attention import decode_order

pytestmark = pytest.mark.usefixtures("triton_interpreter")
BLOCK, ROWS, REAL = 4, 16, 13  # a 16-row graph serving 13 sequences: 3 padding rows


@pytest.mark.parametrize("fused_merge", [False, True])
@torch.inference_mode()
def test_two_halves_match_one_stream(fused_merge):
    llm = LLM(
        "tiny",
        device="cpu",
        cache_config=CacheConfig(block_size=BLOCK, num_blocks=512),
        runner_config=RunnerConfig(attention_backend="triton", fused_decode_merge=fused_merge),
    )
    runner = llm.engine.runner
    runner.kv_cache.normal_()
    rng = random.Random(2)
    lens = np.array([rng.randint(1, 120) for _ in range(REAL)] + [0] * (ROWS - REAL))
    max_blocks = 32
    tables = torch.tensor(rng.sample(range(512), ROWS * max_blocks), dtype=torch.int32).view(ROWS, max_blocks)
    pos = np.maximum(lens - 1, 0)
    slots = [int(tables[i, p // BLOCK]) * BLOCK + p % BLOCK if i < REAL else -1 for i, p in enumerate(pos)]
    out = {}
    for two_stream_min in (0, 8):
        graphs = DecodeGraphs(
            runner.model, ROWS, max_blocks, 128, runner.device, runner.split_counters, two_stream_min
        )
        h = graphs.split_at(ROWS)
        assert h == (8 if two_stream_min else 0) and graphs.side is None  # no CUDA: halves in turn
        graphs.block_tables.copy_(tables)
        graphs.seq_lens.copy_(torch.from_numpy(lens))
        graphs.positions.copy_(torch.from_numpy(pos))
        graphs.slots.copy_(torch.tensor(slots))
        graphs.input_ids.copy_(torch.arange(3, 3 + ROWS))
        order = np.concatenate([decode_order(lens[:h]), decode_order(lens[h:])]) if h else decode_order(lens)
        graphs.order.copy_(torch.from_numpy(order))
        hidden, logits = graphs._forward(ROWS)
        out[two_stream_min] = (hidden[:REAL].clone(), logits[:REAL].clone())
        if fused_merge:
            assert not runner.split_counters.any()
    torch.testing.assert_close(out[8][0], out[0][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[8][1], out[0][1], rtol=1e-5, atol=1e-5)
