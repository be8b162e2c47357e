"""CUDA graphs for decode steps.

A decode step (one new token per sequence) runs the same kernels every time; only the data
changes. Graphs are captured once per padded batch size over static input buffers; a step copies
its inputs into the first rows, marks the padding rows (slot -1: nothing stored; seq_len 0:
attention writes zeros) and replays. Weights are updated in place and the KV cache never moves,
so graphs stay valid across weight updates.

The LM head is captured too: a graph returns logits for its padded size. Run eagerly on the
step's own row count, the head's GEMM met a new shape every time a request finished, and cuBLAS
spends milliseconds of host time choosing a kernel for each new shape.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

import torch
from torch import nn

from rollout.models.layers.attention import AttentionMetadata

T = TypeVar("T")

_SMALL_SIZES = (1, 2, 4, 8)  # then every multiple of _SIZE_STEP
_SIZE_STEP = 16


def graph_batch_sizes(max_batch: int) -> list[int]:
    """Padded batch sizes with a graph: 1, 2, 4, 8, then every multiple of 16 up to max_batch."""
    small = [s for s in _SMALL_SIZES if s < max_batch]
    return sorted(set(small + list(range(_SIZE_STEP, max_batch, _SIZE_STEP)) + [max_batch]))


def padded_rows(rows: int) -> int:
    """The row count an eager step's LM head runs on for ``rows`` sampling rows: 1, 2, 4, 8, then
    a multiple of 16 (the graph sizes). A GEMM of a shape cuBLAS has not met costs milliseconds of
    host time while it picks a kernel; with a few row counts it meets each once."""
    for size in _SMALL_SIZES:
        if rows <= size:
            return size
    return -(-rows // _SIZE_STEP) * _SIZE_STEP


def padded_tokens(tokens: int, cap: int) -> int:
    """The row count an eager step's forward runs on for ``tokens`` tokens (never more than
    ``max(tokens, cap)``): ``padded_rows`` up to 256, then 8 sizes per doubling (a multiple of
    1/8 of the power of two below: at most 12.5% padding). Every GEMM of the step takes this row
    count, so a long run meets a few dozen shapes instead of one per step, and cuBLAS picks a
    kernel once for each (see ``padded_rows``)."""
    if tokens <= 256:
        size = padded_rows(tokens)
    else:
        step = 1 << (tokens.bit_length() - 4)
        size = -(-tokens // step) * step
    return min(size, max(tokens, cap))


def capture_by_size(
    sizes: Iterable[int], run: Callable[[int], T], device: torch.device, warmups: int
) -> tuple[dict[int, torch.cuda.CUDAGraph], dict[int, T]]:
    """Capture ``run(size)`` for every size, largest first, all in one memory pool (a graph's
    temporaries are dead when it ends, so the smaller graphs reuse the larger's), each after
    ``warmups`` uncaptured runs (kernels compiled and GEMM algorithms picked outside the capture).
    Returns the graphs and what the captured runs returned (static tensors every replay rewrites)."""
    graphs: dict[int, torch.cuda.CUDAGraph] = {}
    outputs: dict[int, T] = {}
    pool = None
    for size in sorted(sizes, reverse=True):
        for _ in range(warmups):
            run(size)
        torch.cuda.synchronize(device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            outputs[size] = run(size)
        pool = graph.pool()
        graphs[size] = graph
    torch.cuda.synchronize(device)
    return graphs, outputs


def eager_token_sizes(cap: int) -> list[int]:
    """Every row count ``padded_tokens(tokens, cap)`` gives for 1 <= tokens <= cap."""
    return sorted({padded_tokens(t, cap) for t in range(1, cap + 1)})


class DecodeGraphs:
    """Captured forwards and LM heads of ``model`` for decode batches up to ``max_batch`` sequences."""

    def __init__(
        self,
        model: nn.Module,
        max_batch: int,
        max_blocks: int,
        max_seq_len: int,
        device: torch.device,
        split_counters: torch.Tensor | None = None,
    ) -> None:
        """``split_counters``: see ``AttentionMetadata.split_counters`` (None: merge kernels)."""
        self.model = model
        self.split_counters = split_counters
        self.sizes = graph_batch_sizes(max_batch)
        self.max_batch = self.sizes[-1]
        self.max_blocks = max_blocks
        self.max_seq_len = max_seq_len  # upper bound on any sequence a graph serves
        self.device = device
        # Without CUDA nothing is captured: each replay runs the forward over the same buffers and
        # copies its outputs into the first run's (the CPU tests' path to what reads them).
        self.captured = device.type == "cuda"
        n = self.max_batch
        # Static device inputs the graphs read; rows past a step's batch are padding.
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slots = torch.full((n,), -1, dtype=torch.long, device=device)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(n, max_blocks, dtype=torch.int32, device=device)
        self.order = torch.arange(n, dtype=torch.int32, device=device)  # decode kernel start order
        self.query_start = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # size -> (hidden, logits)

    def _meta(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slots[:size],
            block_tables=self.block_tables[:size],
            seq_lens=self.seq_lens[:size],
            query_start_loc=self.query_start[: size + 1],
            seq_lens_host=[0] * size,  # unused by the graph-safe (triton) decode path
            query_start_loc_host=list(range(size + 1)),
            max_seq_len=self.max_seq_len,
            max_query_len=1,
            decode_order=self.order[:size],
            split_counters=self.split_counters,
        )

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every size (``capture_by_size``); without CUDA, run each once for its outputs."""
        if not self.captured:
            self.outputs = {size: self._forward(size) for size in self.sizes}
            return
        self.graphs, self.outputs = capture_by_size(self.sizes, self._forward, self.device, warmups=2)

    def _forward(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.model(self.input_ids[:size], self.positions[:size], self._meta(size))
        return hidden, self.model.compute_logits(hidden)

    def padded_size(self, batch: int) -> int | None:
        """The graph size that serves ``batch`` sequences, or None when none does."""
        for s in self.sizes:
            if s >= batch:
                return s
        return None

    def replay(
        self,
        size: int,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        seq_lens: torch.Tensor,
        block_tables: torch.Tensor,
        order: torch.Tensor,
        fill: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the graph of ``size`` on inputs of ``size`` rows (padding rows already marked; host or
        device tensors, any integer dtype); ``block_tables`` may be narrower than max_blocks;
        ``order`` is a permutation of the rows (``AttentionMetadata.decode_order``).
        ``fill = (rows, ids)`` then overwrites those rows' input ids on the device (tokens sampled
        by a step still in flight). Returns hidden states [size, hidden] and logits [size, vocab]
        in the model dtype (padding rows hold garbage)."""
        self.input_ids[:size].copy_(input_ids, non_blocking=True)
        if fill is not None:
            self.input_ids.index_copy_(0, fill[0], fill[1])
        self.positions[:size].copy_(positions, non_blocking=True)
        self.slots[:size].copy_(slots, non_blocking=True)
        self.seq_lens[:size].copy_(seq_lens, non_blocking=True)
        self.block_tables[:size, : block_tables.shape[1]].copy_(block_tables, non_blocking=True)
        self.order[:size].copy_(order, non_blocking=True)
        if self.captured:
            self.graphs[size].replay()
        else:
            with torch.inference_mode():
                for static, now in zip(self.outputs[size], self._forward(size), strict=True):
                    static.copy_(now)
        return self.outputs[size]
