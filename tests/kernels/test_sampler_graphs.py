"""What the sampler graphs capture (rollout.sampler_graphs), run uncaptured: the fused kernel in its
general form over a padded graph batch, reading the rows a step wrote into the graph's static
buffer, gives ``sample``'s tokens and logprobs. Runs in Triton's interpreter on the CPU and compiled
on CUDA (the capture itself: tests/rollout/test_sampler_graphs_gpu.py)."""

from __future__ import annotations

import pytest
import torch

from rollout.sampler_graphs import SamplerGraphs
from rollout.samplers import RowSampling, SamplingParams, SamplingTensors, sample
from rollout.samplers.sampler import fused_output
from rollout.samplers.tensors import LogitBiasColumns, effective_values, same_device
from rollout.sampling_rows import SamplingRows

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
V = 1000
SIZE = 8  # the graph's padded batch: rows past the step's are padding

ROWS = [  # every kind of row fused_only admits
    SamplingParams(temperature=0.0, max_tokens=4),  # greedy, raw
    SamplingParams(temperature=0.7, max_tokens=4),
    SamplingParams(temperature=1.3, logprobs_mode="processed", max_tokens=4),
    SamplingParams(temperature=0.9, logprobs=3, max_tokens=4),  # top logprobs of the raw logits
    SamplingParams(temperature=0.0, logprobs=2, max_tokens=4),
]


def _step_rows(params: list[SamplingParams], first_offset: int) -> list[RowSampling]:
    return [RowSampling(p, 1000 + 7 * i, first_offset + i) for i, p in enumerate(params)]


@pytest.mark.parametrize("num", [1, 3, 5])
def test_general_kernel_over_the_static_buffer_matches_sample(triton_interpreter, num):
    logits = (torch.randn(SIZE, V, generator=torch.Generator().manual_seed(num)) * 4).to(DEVICE)
    graphs = SamplerGraphs({SIZE: logits}, V, DEVICE)
    views = graphs.tensors(SIZE)  # what the graph was captured over
    assert views.batch_size == SIZE and views.temperature.data_ptr() == graphs.buffer(SIZE).data_ptr()
    for step in range(2):  # the buffer rewritten by a second step: the views see the new rows
        rows = _step_rows(ROWS[:num], first_offset=step * 10)
        vals = [effective_values(r.params, V) for r in rows]
        seeds, offsets = [r.seed for r in rows], [r.offset for r in rows]
        t = SamplingTensors.from_columns(
            vals, seeds, offsets, [], [], V, DEVICE, min_rows=SIZE, out=graphs.buffer(SIZE)
        )
        assert t.temperature.data_ptr() == views.temperature.data_ptr() and t.batch_size == num
        assert views.greedy[num:].all() and (views.temperature[num:] == 1).all()  # padding: greedy, T = 1
        got = graphs.run(SIZE, views)
        assert got.token_ids[num:].tolist() == logits[num:].argmax(dim=-1).tolist()
        k = t.max_num_logprobs
        out = fused_output(got.token_ids[:num], got.logprobs[:num], got.lse[:num], logits[:num], k)
        ref = sample(logits[:num], SamplingTensors.build(rows, V, DEVICE), use_kernel=False)
        assert out.token_ids.tolist() == ref.token_ids.tolist()
        torch.testing.assert_close(out.logprobs, ref.logprobs, rtol=0, atol=2e-5)
        assert got.packed[0, :num].tolist() == [float(x) for x in ref.token_ids.tolist()]
        torch.testing.assert_close(got.packed[1, :num].float(), out.logprobs, rtol=0, atol=0)
        for i, r in enumerate(rows):  # top logprobs of the rows that ask (the others' are dropped)
            if r.params.logprobs:
                assert out.topk_ids is not None and ref.topk_ids is not None
                assert (
                    out.topk_ids[i, : r.params.logprobs].tolist()
                    == ref.topk_ids[i, : r.params.logprobs].tolist()
                )
                torch.testing.assert_close(
                    out.topk_logprobs[i, : r.params.logprobs],
                    ref.topk_logprobs[i, : r.params.logprobs],
                    rtol=0,
                    atol=2e-5,
                )


def test_from_columns_into_a_buffer_equals_a_plain_build():
    rows = _step_rows(ROWS[:3], first_offset=4)
    vals = [effective_values(r.params, V) for r in rows]
    seeds, offsets = [r.seed for r in rows], [r.offset for r in rows]
    buf = torch.zeros(SamplingTensors.buffer_bytes(20), dtype=torch.uint8)
    into = SamplingTensors.from_columns(
        vals, seeds, offsets, [], [], V, torch.device("cpu"), min_rows=20, out=buf
    )
    plain = SamplingTensors.from_columns(vals, seeds, offsets, [], [], V, torch.device("cpu"))
    for name in ("temperature", "greedy", "top_k", "top_p", "min_p", "seeds", "offsets", "processed_mode"):
        a, b = getattr(into, name), getattr(plain, name)
        assert torch.equal(a, b), name
        assert buf.data_ptr() <= a.data_ptr() < buf.data_ptr() + buf.numel(), name
    assert into.offsets.data_ptr() - buf.data_ptr() == 34 * 32 - 8 * 32  # laid out for 32 rows (20 -> 32)
    with pytest.raises(ValueError, match="at least 1088 bytes"):
        SamplingTensors.from_columns(
            vals, seeds, offsets, [], [], V, torch.device("cpu"), min_rows=20, out=buf[:100]
        )
    with pytest.raises(ValueError, match="uint8"):
        SamplingTensors.from_columns(
            vals, seeds, offsets, [], [], V, torch.device("cpu"), out=torch.zeros(600, dtype=torch.int32)
        )


def _rows_of(*params: SamplingParams, banned: bool = False) -> SamplingRows:
    rows = SamplingRows(values=[effective_values(p, V) for p in params])
    rows.penalized = [i for i, v in enumerate(rows.values) if v.has_penalties]
    if banned:
        rows.banned_rows, rows.banned_tokens = [0], [2]
    return rows


def test_fused_only_admits_what_the_kernel_serves_alone():
    assert _rows_of(*ROWS).fused_only(V)
    refused = [
        SamplingParams(temperature=0.8, top_p=0.9),
        SamplingParams(temperature=0.8, top_k=20),
        SamplingParams(temperature=0.8, min_p=0.1),
        SamplingParams(temperature=0.8, presence_penalty=0.5),
        SamplingParams(temperature=0.8, repetition_penalty=1.1),
        SamplingParams(temperature=0.8, logprobs=1, logprobs_mode="processed"),
    ]
    for p in refused:
        assert not _rows_of(ROWS[1], p).fused_only(V), p
    biased = _rows_of(ROWS[1])
    biased.bias = LogitBiasColumns()
    assert not biased.fused_only(V)
    assert not _rows_of(ROWS[1], banned=True).fused_only(V)
    # filters a greedy raw row never reads are neutral: still fused
    assert _rows_of(SamplingParams(temperature=0.0, top_p=0.5, top_k=3)).fused_only(V)


def test_logits_of_the_wrong_shape_are_refused():
    with pytest.raises(ValueError, match=r"must be \[4, 1000\]"):
        SamplerGraphs({4: torch.zeros(4, 999)}, V, torch.device("cpu"))


def test_same_device_reads_a_bare_cuda_as_the_current_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert same_device(cpu, torch.device("cpu")) and not same_device(cpu, cuda) and not same_device(cuda, cpu)
    if torch.cuda.is_available():
        here = torch.device("cuda", torch.cuda.current_device())
        assert same_device(cuda, here) and same_device(here, cuda) and same_device(cuda, cuda)
        assert not same_device(here, torch.device("cuda", here.index + 1))
