"""W3's floor: the KV each timed decode step reads, from the sequences' real lengths."""

from __future__ import annotations

import random

from rollout import LLM, CacheConfig, SchedulerConfig
from rollout.benchmarks.decode import time_decode
from tests.models.tiny_models import BENCH_SHAPE, tiny_config


def test_time_decode_reports_the_kv_length_it_timed(tmp_path):
    """Sequences admitted first decode while later ones prefill: by the timed steps each holds more
    than ``context`` tokens, and the floor must count what is there (256 x 1K: 1,051, 2.5% more)."""
    # config only (dummy weights); time_decode draws prompt ids up to 10,000
    tiny_config("qwen3", max_position_embeddings=2048, **BENCH_SHAPE).save_pretrained(tmp_path)
    llm = LLM(
        str(tmp_path),
        load_format="dummy",
        device="cpu",
        cache_config=CacheConfig(num_blocks=512),
        scheduler_config=SchedulerConfig(max_num_batched_tokens=256),
    )
    eng = llm.engine
    lengths: list[list[int]] = []
    step = eng.step

    def traced():
        out = step()
        lengths.append([r.num_computed_tokens for r in eng.scheduler.running])
        return out

    eng.step = traced
    ms, kv_tokens = time_decode(llm, 8, 128, 6, random.Random(0))  # 1,024 prompt tokens: 4+ steps
    assert ms > 0
    timed = lengths[-7:]  # the state before each timed step and after the last
    want = (sum(timed[0]) + sum(timed[-1])) / 2 / 8
    assert kv_tokens == want and kv_tokens > 128 + 6
