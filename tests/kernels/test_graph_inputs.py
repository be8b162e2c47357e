"""kernels.graph_inputs: the decode graph's input unpacking against its torch reference (the Triton
interpreter on CPU, compiled on CUDA), and its launcher's checks."""

from __future__ import annotations

import pytest
import torch

from rollout.kernels.graph_inputs import staged_entries, unpack_decode_inputs, unpack_decode_inputs_ref

pytestmark = pytest.mark.usefixtures("triton_interpreter")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def staged(size: int, width: int, last: int, seed: int) -> torch.Tensor:
    """A random step in the graph layout: row 0 takes its token from ``last``, the last row (of two
    or more) keeps its staged one, followed by entries the kernel must not read."""
    g = torch.Generator().manual_seed(seed)
    stage = torch.randint(0, 1000, (staged_entries(size, width) + 7,), generator=g)
    src = torch.randint(-1, last, (size,), generator=g)
    src[-1] = -1
    src[0] = 0  # the boundary: a source of row 0
    stage[5 * size : 6 * size] = src
    stage[6 * size] = width
    return stage.to(DEVICE)


def outputs(size: int, max_width: int, last: int) -> list[torch.Tensor]:
    """Destination buffers with sentinel values, larger than ``size`` rows."""
    return [
        torch.full((last,), -5, dtype=torch.long, device=DEVICE).add_(torch.arange(last, device=DEVICE)),
        torch.full((size + 3,), -7, dtype=torch.long, device=DEVICE),
        torch.full((size + 3,), -7, dtype=torch.int32, device=DEVICE),
        torch.full((size + 3,), -7, dtype=torch.int32, device=DEVICE),
        torch.full((size + 3, max_width), -7, dtype=torch.int32, device=DEVICE),
    ]


@pytest.mark.parametrize(
    "size,width", [(1, 1), (1, 3), (2, 130), (5, 128), (16, 257), (3, 0)]
)  # widths around the kernel's 128-entry tile, and none
def test_unpack_matches_the_reference(size, width):
    stage = staged(size, width, last=9, seed=size * 1000 + width)
    max_width = max(width, 1) + 2
    got, want = outputs(size, max_width, 9), outputs(size, max_width, 9)
    unpack_decode_inputs(stage, size, *got)
    unpack_decode_inputs_ref(stage, size, *want)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    last, ids, seq_lens, order, tables = got
    src = stage[5 * size : 6 * size]
    # rows with a source took the in-flight token, the others the staged one
    assert torch.equal(ids[:size], torch.where(src >= 0, last[src.clamp(min=0)], stage[:size]))
    assert src[0] >= 0 and (size == 1 or src[-1] < 0)
    assert torch.equal(seq_lens[:size].long(), stage[3 * size : 4 * size])
    assert torch.equal(order[:size].long(), stage[4 * size : 5 * size])
    body = stage[6 * size + 1 : 6 * size + 1 + size * width].view(size, width)
    assert torch.equal(tables[:size, :width].long(), body)
    # nothing past the step's rows and width is written
    assert (ids[size:] == -7).all() and (seq_lens[size:] == -7).all() and (order[size:] == -7).all()
    assert (tables[size:] == -7).all() and (tables[:, width:] == -7).all()


def test_unpack_checks_its_arguments():
    size = 2
    stage = staged(size, 2, last=4, seed=0)
    last, ids, seq_lens, order, tables = outputs(size, 4, 4)
    good = dict(last_tokens=last, input_ids=ids, seq_lens=seq_lens, order=order, block_tables=tables)
    unpack_decode_inputs(stage, size, **good)
    bad = {
        "input_ids": ids.int(),  # ids are int64
        "seq_lens": seq_lens.long(),  # lengths are int32
        "order": order[:1],  # fewer rows than size
        "block_tables": tables.t(),  # columns not contiguous
        "last_tokens": last.view(2, 2),
    }
    for name, value in bad.items():
        with pytest.raises(ValueError, match=name):
            unpack_decode_inputs(stage, size, **{**good, name: value})
    with pytest.raises(ValueError, match="stage"):
        unpack_decode_inputs(stage[: 6 * size], size, **good)  # no width entry
    with pytest.raises(ValueError, match="stage"):
        unpack_decode_inputs(stage.int(), size, **good)
    with pytest.raises(ValueError, match="size"):
        unpack_decode_inputs(stage, 0, **good)


def decode_batch(block_size: int):
    """Three decoding requests (one's input token still on the device), for ``prepare_inputs``."""
    from rollout.request import Request
    from rollout.samplers.params import SamplingParams
    from rollout.scheduler import ScheduledBatch, ScheduledRequest

    reqs = []
    for i, (length, blocks) in enumerate([(5, [3, 7]), (9, [1, 4, 8]), (2, [6])]):
        r = Request(
            f"r{i}", list(range(10 + i, 10 + i + length)), SamplingParams(), 0, frozenset(), 64, i, f"r{i}"
        )
        r.block_ids = blocks
        reqs.append(r)
    # r1's last token is a placeholder: position 9 is past its 9 known tokens
    scheduled = [ScheduledRequest(reqs[0], 4, 1, True), ScheduledRequest(reqs[1], 9, 1, True),
                 ScheduledRequest(reqs[2], 1, 1, True)]  # fmt: skip
    return ScheduledBatch(scheduled, 3), reqs


def test_graph_layout_unpacks_to_the_copied_inputs():
    """``prepare_inputs(graph_layout=True)`` begins with the kernel's layout, and unpacking it gives
    the inputs the copying path builds from the other layout (with the in-flight token filled)."""
    from rollout.step_inputs import prepare_inputs

    batch, reqs = decode_batch(block_size=4)
    prev_rows = {id(reqs[1]): 2}  # r1's token is row 2 of the step in flight
    size, cpu = 4, torch.device("cpu")
    staged = prepare_inputs(batch, size, 4, cpu, lambda r: prev_rows[id(r)], graph_layout=True)
    plain = prepare_inputs(batch, size, 4, cpu, lambda r: prev_rows[id(r)])
    assert staged.num_placeholders == plain.num_placeholders == 1
    offsets = [staged.layout[f][0] for f in ("input_ids", "positions", "slots", "seq_lens", "decode_order")]
    assert offsets == [0, size, 2 * size, 3 * size, 4 * size]
    assert staged.layout["input_src"][:2] == (5 * size, size)
    assert staged.layout["block_tables"][0] == 6 * size + 1
    last = torch.tensor([50, 51, 52])
    width = 3
    ids, lens, order = (
        torch.zeros(size, dtype=torch.long),
        torch.zeros(size, dtype=torch.int32),
        torch.zeros(size, dtype=torch.int32),
    )
    tables = torch.zeros(size, width, dtype=torch.int32)
    unpack_decode_inputs_ref(staged.ints, size, last, ids, lens, order, tables)
    v = plain.views_np()
    want_ids = torch.from_numpy(v["input_ids"].copy())
    want_ids[v["placeholder_dst"]] = last[v["placeholder_src"]]
    assert ids.tolist() == want_ids.tolist() == [14, 52, 13, 0]  # r1's token from the device
    assert lens.tolist() == v["seq_lens"].tolist() == [5, 10, 2, 0]
    assert order.tolist() == v["decode_order"].tolist()
    assert tables.tolist() == v["block_tables"].tolist()
    sv = staged.views_np()
    for name in ("positions", "slots"):  # read in place by the graph
        assert sv[name].tolist() == v[name].tolist()
    assert sv["slots"][-1] == -1  # the padding row stores nothing


def test_graph_layout_is_for_decode_steps():
    from rollout.scheduler import ScheduledBatch, ScheduledRequest
    from rollout.step_inputs import prepare_inputs

    batch, reqs = decode_batch(block_size=4)
    prefill = ScheduledBatch([ScheduledRequest(reqs[0], 0, 5, True)], 5)
    with pytest.raises(ValueError, match="decode-only"):
        prepare_inputs(prefill, 5, 4, torch.device("cpu"), graph_layout=True)
    with pytest.raises(ValueError, match="decode-only"):
        prepare_inputs(batch, 4, 4, torch.device("cpu"), pad_rows=True, graph_layout=True)
