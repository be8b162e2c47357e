"""Row-count buckets of the decode graphs and of the eager LM head (pure functions: CPU)."""

from __future__ import annotations

from rollout.cuda_graphs import graph_batch_sizes, padded_rows


def test_padded_rows_cover_every_count_with_few_shapes():
    buckets = [padded_rows(n) for n in range(1, 1025)]
    assert all(b >= n for n, b in zip(range(1, 1025), buckets, strict=True))
    assert all(b - n < 16 for n, b in zip(range(1, 1025), buckets, strict=True))  # at most 15 extra rows
    assert len(set(buckets[:256])) == len(graph_batch_sizes(256)) == 20  # the graph sizes up to 256
    assert set(buckets[:256]) == set(graph_batch_sizes(256))
    assert padded_rows(1) == 1 and padded_rows(3) == 4 and padded_rows(17) == 32 and padded_rows(300) == 304
