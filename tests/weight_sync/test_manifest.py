"""Manifests: bucket layout, the wire round trip, and refusal of anything malformed."""

from __future__ import annotations

import pytest
import torch

from rollout.weight_sync.manifest import ALIGN, Manifest, pack, plan_buckets, unpack

SPECS = [
    ("a", (10,), torch.float32),
    ("b", (3, 7), torch.bfloat16),
    ("big", (40, 40), torch.float32),  # 6400 bytes: larger than a bucket
    ("c", (5,), torch.float16),
]


def test_layout_respects_bucket_size_alignment_and_order():
    m = plan_buckets(SPECS, bucket_bytes=1024)
    assert [e.name for e in m.entries] == ["a", "b", "big", "c"]
    assert all(e.offset % ALIGN == 0 for e in m.entries)
    assert [e.bucket for e in m.entries] == [0, 0, 1, 2]  # the big one alone, the next one after it
    assert m.bucket_sizes[1] == 6400 and max(m.bucket_sizes[0], m.bucket_sizes[2]) <= 1024
    for b in range(m.num_buckets):  # entries of one bucket never overlap
        spans = sorted((e.offset, e.offset + e.nbytes) for e in m.bucket_entries(b))
        assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:], strict=False))
    assert m.total_bytes == 40 + 42 + 6400 + 10


def test_wire_round_trip_and_pack_unpack():
    m = plan_buckets(SPECS, bucket_bytes=1024)
    assert Manifest.from_wire(m.to_wire()) == m
    tensors = {n: torch.randn(s).to(d) for n, s, d in SPECS}
    for b in range(m.num_buckets):
        entries = m.bucket_entries(b)
        buf = torch.zeros(m.bucket_sizes[b], dtype=torch.uint8)
        pack((tensors[e.name].float() for e in entries), entries, buf)  # the cast happens in pack
        for name, view in unpack(buf, entries):
            assert view.dtype == tensors[name].dtype and torch.equal(view, tensors[name])


def test_pack_refuses_a_tensor_whose_shape_differs_from_its_entry():
    """``copy_`` would broadcast a [7] tensor into a [3, 7] entry; pack names the weight instead and
    writes nothing."""
    m = plan_buckets(SPECS, bucket_bytes=1024)
    entries = m.bucket_entries(0)  # a (10,) float32, b (3, 7) bfloat16
    buf = torch.zeros(m.bucket_sizes[0], dtype=torch.uint8)
    with pytest.raises(ValueError, match="weight 'b'"):
        pack([torch.ones(10), torch.ones(7)], entries, buf)
    assert not buf.any()


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda w: w["entries"][0].__setitem__(1, "int64"), "bad name or dtype"),
        (lambda w: w["entries"][0].__setitem__(2, [-1]), "bad shape"),
        (lambda w: w["entries"][0].__setitem__(3, 9), "out of range"),
        (lambda w: w["entries"][0].__setitem__(4, 3), "bad offset"),
        (lambda w: w["entries"][1].__setitem__(2, [1000]), "overruns"),
        (lambda w: w["entries"][1].__setitem__(0, "a"), "twice"),
        (lambda w: w.__setitem__("extra", 1), "must be a dict"),
        (lambda w: w["entries"].append("x"), "malformed manifest entry"),
    ],
)
def test_malformed_manifests_are_refused(mutate, message):
    wire = plan_buckets(SPECS, bucket_bytes=1024).to_wire()
    mutate(wire)
    with pytest.raises(ValueError, match=message):
        Manifest.from_wire(wire)


def test_integer_weights_are_refused_when_planning():
    with pytest.raises(ValueError, match="floating dtype"):
        plan_buckets([("x", (2,), torch.int64)])
