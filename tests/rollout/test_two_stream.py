"""Two-halves decode (RunnerConfig.two_stream_decode_min_batch) without a GPU: the split forward
equals the whole-batch forward, each half gets its own decode order, and bad settings fail."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from rollout import LLM, CacheConfig, RunnerConfig, SamplingParams
from rollout.cuda_graphs import two_halves_forward
from rollout.models.layers.attention import AttentionMetadata, decode_order
from rollout.step_inputs import prepare_inputs

BLOCK = 16


def decode_meta(lens: torch.Tensor, tables: torch.Tensor) -> tuple[torch.Tensor, AttentionMetadata]:
    pos = (lens - 1).long()
    slots = tables.gather(1, (pos // BLOCK)[:, None]).squeeze(1).long() * BLOCK + pos % BLOCK
    n = lens.shape[0]
    meta = AttentionMetadata(
        slot_mapping=slots,
        block_tables=tables,
        seq_lens=lens,
        query_start_loc=torch.arange(n + 1, dtype=torch.int32),
        seq_lens_host=lens.tolist(),
        query_start_loc_host=list(range(n + 1)),
        max_seq_len=int(lens.max()),
        max_query_len=1,
        decode_order=torch.from_numpy(decode_order(lens.numpy())).to(torch.int32),
    )
    return pos, meta


@torch.inference_mode()
def test_two_halves_give_the_whole_batch_forward():
    llm = LLM("tiny", device="cpu", cache_config=CacheConfig(block_size=BLOCK, num_blocks=256))
    runner = llm.engine.runner
    runner.kv_cache.normal_()  # attention over random K/V, not zeros
    rng = random.Random(0)
    lens = torch.tensor([rng.randint(1, 90) for _ in range(11)], dtype=torch.int32)
    blocks = rng.sample(range(256), 11 * 6)
    tables = torch.tensor(blocks, dtype=torch.int32).view(11, 6)
    ids = torch.randint(3, runner.vocab_size, (11,))
    pos, meta = decode_meta(lens, tables)
    want = runner.model(ids, pos, meta)
    for h in (5, 1, 10):
        _, meta_a = decode_meta(lens[:h], tables[:h])
        _, meta_b = decode_meta(lens[h:], tables[h:])
        got = two_halves_forward(runner.model, ids, pos, meta_a, meta_b, None)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    _, wrong_b = decode_meta(lens[5:], tables[5:].flip(0))  # half B on the wrong pages
    got = two_halves_forward(runner.model, ids, pos, meta_a_of(lens, tables, 5), wrong_b, None)
    torch.testing.assert_close(got[:5], want[:5], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got[5:], want[5:], rtol=1e-3, atol=1e-3)


def meta_a_of(lens: torch.Tensor, tables: torch.Tensor, h: int) -> AttentionMetadata:
    return decode_meta(lens[:h], tables[:h])[1]


def test_each_half_gets_its_own_decode_order():
    llm = LLM("tiny", device="cpu", cache_config=CacheConfig(block_size=4, num_blocks=256))
    engine = llm.engine
    rng = random.Random(1)
    params = SamplingParams(max_tokens=50, ignore_eos=True)
    for i in range(7):
        engine.add_request(f"r{i}", [rng.randrange(3, 200) for _ in range(rng.randint(2, 30))], params)
    while engine.scheduler.waiting or any(r.in_prefill for r in engine.scheduler.running):
        engine.step()
    batch = engine.scheduler.schedule()
    assert batch.num_tokens == len(batch.requests) == 7  # a decode step
    host = prepare_inputs(batch, 8, 4, torch.device("cpu"), order_split=4)  # 7 rows + 1 padding
    v = host.views_np()
    lens = v["seq_lens"][:8]
    assert list(v["decode_order"][:4]) == list(decode_order(lens[:4]))
    assert list(v["decode_order"][4:8]) == list(decode_order(lens[4:8]))  # local: 0..3
    assert sorted(v["decode_order"][4:8]) == [0, 1, 2, 3] and lens[7] == 0
    plain = prepare_inputs(batch, 8, 4, torch.device("cpu")).views_np()
    assert np.array_equal(plain["decode_order"][:8], decode_order(lens))
    with pytest.raises(ValueError, match="order_split must be in \\(0, 8\\) for 8 decode rows, got 8"):
        prepare_inputs(batch, 8, 4, torch.device("cpu"), order_split=8)


@pytest.mark.parametrize("bad", [-1, 1])
def test_bad_two_stream_setting_is_refused(bad):
    match = f"two_stream_decode_min_batch must be 0 \\(off\\) or >= 2, got {bad}"
    with pytest.raises(ValueError, match=match):
        RunnerConfig(two_stream_decode_min_batch=bad)
