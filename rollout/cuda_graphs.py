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
    sizes: Iterable[int],
    run: Callable[[int], T],
    device: torch.device,
    warmups: int,
    prepare: Callable[[int], None] | None = None,
) -> tuple[dict[int, torch.cuda.CUDAGraph], dict[int, T]]:
    """Capture ``run(size)`` for every size, largest first, all in one memory pool (a graph's
    temporaries are dead when it ends, so the smaller graphs reuse the larger's), each after
    ``warmups`` uncaptured runs (kernels compiled and GEMM algorithms picked outside the capture)
    and after ``prepare(size)`` (not captured: e.g. inputs the runs may read). Returns the graphs
    and what the captured runs returned (static tensors every replay rewrites)."""
    graphs: dict[int, torch.cuda.CUDAGraph] = {}
    outputs: dict[int, T] = {}
    pool = None
    for size in sorted(sizes, reverse=True):
        if prepare is not None:
            prepare(size)
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
        staged_rows: int = 0,
    ) -> None:
        """``split_counters``: see ``AttentionMetadata.split_counters`` (None: merge kernels).
        ``staged_rows > 0``: steps come staged (``replay_staged``) and ``last_tokens`` holds the
        tokens of up to that many rows sampled by the step in flight."""
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
        # Staged steps: one copy of the step's packed inputs (kernels.graph_inputs' layout, then
        # the rest of the step's fields), unpacked by the graph's first kernel; the positions and
        # slots are read where they land.
        self.staged = staged_rows > 0
        # the graph layout, then query starts, logits rows and up to 1 spare (kernels.graph_inputs)
        entries = 6 * n + 1 + n * max_blocks + 2 * n + 2 if self.staged else 0
        self.staging = torch.zeros(entries, dtype=torch.long, device=device)
        self.last_tokens = torch.zeros(staged_rows, dtype=torch.long, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # size -> (hidden, logits)

    def _positions_slots(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.staged:
            return self.staging[size : 2 * size], self.staging[2 * size : 3 * size]
        return self.positions[:size], self.slots[:size]

    def _meta(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self._positions_slots(size)[1],
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
        prepare = self._stage_idle if self.staged else None
        if not self.captured:
            for size in self.sizes:
                if prepare is not None:
                    prepare(size)
                self.outputs[size] = self._forward(size)
            return
        self.graphs, self.outputs = capture_by_size(
            self.sizes, self._forward, self.device, warmups=2, prepare=prepare
        )

    def _stage_idle(self, size: int) -> None:
        """Stage ``size`` padding rows (no slot, length 0, in row order, no input source, no block
        table columns): what the runs before and during a capture read, which must store nothing
        and leave the split counters at zero (every row once in the decode order)."""
        s = size
        self.staging.zero_()
        self.staging[2 * s : 3 * s] = -1
        self.staging[4 * s : 5 * s] = torch.arange(s, device=self.device)
        self.staging[5 * s : 6 * s] = -1

    def _forward(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.staged:
            from rollout.kernels.graph_inputs import unpack_decode_inputs  # (imports Triton)

            tables, ids, lens, order = self.block_tables, self.input_ids, self.seq_lens, self.order
            unpack_decode_inputs(self.staging, size, self.last_tokens, ids, lens, order, tables)
        positions = self._positions_slots(size)[0]
        hidden = self.model(self.input_ids[:size], positions, self._meta(size))
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
        if self.staged:
            raise ValueError("these graphs read their inputs from the staging buffer: replay_staged")
        self.input_ids[:size].copy_(input_ids, non_blocking=True)
        if fill is not None:
            self.input_ids.index_copy_(0, fill[0], fill[1])
        self.positions[:size].copy_(positions, non_blocking=True)
        self.slots[:size].copy_(slots, non_blocking=True)
        self.seq_lens[:size].copy_(seq_lens, non_blocking=True)
        self.block_tables[:size, : block_tables.shape[1]].copy_(block_tables, non_blocking=True)
        self.order[:size].copy_(order, non_blocking=True)
        return self._replay(size)

    def replay_staged(self, size: int, ints: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the graph of ``size`` on a step packed in ``ints`` (a host or device int64 tensor in
        ``kernels.graph_inputs``' layout for ``size`` rows and block tables ``width`` wide, then
        anything else, which the staging buffer keeps for the caller: ``staged_view``): one copy,
        then the replay. The input sources index ``last_tokens``. Returns what ``replay`` returns."""
        if not self.staged or ints.dtype != torch.long or ints.dim() != 1:
            raise ValueError(f"staged replay needs staged_rows > 0 and 1-D int64 inputs, got {ints.dtype}")
        if ints.shape[0] > self.staging.shape[0] or width > self.max_blocks:
            raise ValueError(
                f"{ints.shape[0]} staged entries of width {width} exceed the staging buffer "
                f"({self.staging.shape[0]} entries, {self.max_blocks} blocks per row)"
            )
        self.staging[: ints.shape[0]].copy_(ints, non_blocking=True)
        return self._replay(size)

    def staged_view(self, entries: int) -> torch.Tensor:
        """The leading ``entries`` of the staging buffer (the last staged step's inputs)."""
        return self.staging[:entries]

    def _replay(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.captured:
            self.graphs[size].replay()
        else:
            with torch.inference_mode():
                for static, now in zip(self.outputs[size], self._forward(size), strict=True):
                    static.copy_(now)
        return self.outputs[size]
