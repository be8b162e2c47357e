"""Row-count buckets of the decode graphs, the eager LM head and the eager forward (pure functions:
CPU)."""

from __future__ import annotations

from rollout.cuda_graphs import eager_token_sizes, graph_batch_sizes, padded_rows, padded_tokens


def test_padded_rows_cover_every_count_with_few_shapes():
    buckets = [padded_rows(n) for n in range(1, 1025)]
    assert all(b >= n for n, b in zip(range(1, 1025), buckets, strict=True))
    assert all(b - n < 16 for n, b in zip(range(1, 1025), buckets, strict=True))  # at most 15 extra rows
    assert len(set(buckets[:256])) == len(graph_batch_sizes(256)) == 20  # the graph sizes up to 256
    assert set(buckets[:256]) == set(graph_batch_sizes(256))
    assert padded_rows(1) == 1 and padded_rows(3) == 4 and padded_rows(17) == 32 and padded_rows(300) == 304


def test_padded_tokens_buckets():
    assert [padded_tokens(n, 8192) for n in (1, 3, 9, 17, 256)] == [1, 4, 16, 32, 256]
    assert [padded_tokens(n, 8192) for n in (257, 289, 449, 1000, 5000, 8192)] == [
        288, 320, 480, 1024, 5120, 8192,
    ]  # fmt: skip
    assert padded_tokens(5000, 5000) == 5000 and padded_tokens(4100, 4200) == 4200  # capped
    assert padded_tokens(300, 0) == 300  # never below the tokens
    for n in range(257, 9000, 7):  # at most 1/8 padding, and few sizes
        assert n <= padded_tokens(n, 1 << 20) <= n * 9 // 8
    assert len({padded_tokens(n, 1 << 20) for n in range(1, 8193)}) < 90
    assert all(padded_tokens(n, 1 << 20) == padded_rows(n) for n in range(1, 257))


def test_eager_token_sizes_are_the_padded_counts():
    sizes = eager_token_sizes(8192)
    assert sizes == sorted({padded_tokens(n, 8192) for n in range(1, 8193)})
    assert sizes[:5] == [1, 2, 4, 8, 16] and sizes[-1] == 8192 and len(sizes) == 60
    assert eager_token_sizes(300) == [*graph_batch_sizes(256), 288, 300]  # capped at 300
