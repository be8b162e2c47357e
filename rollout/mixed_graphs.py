"""CUDA graphs for whole mixed steps (prompt chunks beside decodes): one graph per padded token
count, attention included.

The piecewise graphs (``rollout/piecewise_graphs.py``) leave each layer's attention eager because
its kernels' grids follow the chunk lengths, and the host then takes longer to launch a mixed step
than the GPU takes to run it (W2 on the H200: 13.6 ms of host time per mixed step, ~70% of it the
eager attention). Here the attention replays too, on grids fixed per size:

- the decode kernel runs over the step's leading ``decode_rows`` rows: the decodes (a mixed step
  puts them first) with their KV lengths, the rows after them with length 0 (written with zeros,
  then overwritten by the extend kernel, which runs second);
- the extend kernel runs over a list of (sequence, query tile) entries that the host builds with
  the step's other inputs (``kernels.prefill_attention.fill_extend_tiles``), padded with entries
  that exit at once, with a tile config fixed per size.

Every input the kernels read sits in a static buffer that a step fills with one copy each. On a
device without CUDA graphs (the CPU tests, with the Triton interpreter) the same forward runs
uncaptured over the same buffers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rollout.cuda_graphs import capture_by_size
from rollout.models.layers.attention import AttentionMetadata


@dataclass(frozen=True)
class MixedLayout:
    """The shape of the inputs a step fills for the graph of one size."""

    decode_rows: int  # rows the decode kernel covers: min(size, max_seqs), every decode of a step fits
    tiles: int  # entries of the extend tile list: cdiv(size, tile_positions) + decode_rows
    tile_positions: int  # query positions per extend tile under the size's config


class MixedGraphs:
    """Whole-forward graphs of ``model`` for steps of each of ``sizes`` (padded) tokens over at most
    ``max_seqs`` sequences of at most ``max_blocks`` KV blocks each."""

    def __init__(
        self,
        model: nn.Module,
        sizes: list[int],
        max_seqs: int,
        max_blocks: int,
        max_seq_len: int,
        device: torch.device,
        split_counters: torch.Tensor | None = None,
    ) -> None:
        """``split_counters``: see ``AttentionMetadata.split_counters`` (None: merge kernels)."""
        from rollout.kernels.prefill_attention import default_extend_config, extend_tile_positions

        if not sizes or min(sizes) < 2:  # a step with a prompt chunk has two tokens or more
            raise ValueError(f"mixed graph sizes must be >= 2, got {sizes}")
        if max_seqs < 1 or max_blocks < 1:
            raise ValueError(f"need max_seqs >= 1 and max_blocks >= 1, got {max_seqs}, {max_blocks}")
        self.model = model
        self.split_counters = split_counters
        self.sizes = sorted(set(sizes))
        self.max_seq_len = max_seq_len
        self.device = device
        attn = model.attention_layers()[0]
        group = attn.num_heads // attn.num_kv_heads
        dtype = next(model.parameters()).dtype
        self.configs = {}
        self.layouts: dict[int, MixedLayout] = {}
        for size in self.sizes:
            # the size's token count stands in for its longest chunk: big steps get big tiles
            config = default_extend_config(size, attn.head_dim, group, dtype)
            positions = extend_tile_positions(config, attn.num_heads, attn.num_kv_heads)
            rows = min(size, max_seqs)
            self.configs[size] = config
            self.layouts[size] = MixedLayout(rows, -(-size // positions) + rows, positions)
        n = self.sizes[-1]
        rows = max(layout.decode_rows for layout in self.layouts.values())
        tiles = max(layout.tiles for layout in self.layouts.values())
        i32 = dict(dtype=torch.int32, device=device)
        # Static inputs; what a step does not overwrite is never read (see ``forward``).
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slots = torch.full((n,), -1, dtype=torch.long, device=device)
        self.seq_lens = torch.zeros(max_seqs, **i32)
        self.query_start = torch.zeros(max_seqs + 1, **i32)
        self.block_tables = torch.zeros(max_seqs, max_blocks, **i32)
        self.decode_lens = torch.zeros(rows, **i32)
        self.order = torch.arange(rows, **i32)
        self.tiles = torch.full((tiles, 2), -1, **i32)
        self.captured = device.type == "cuda"
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    def layout(self, size: int) -> MixedLayout | None:
        """The inputs the graph of ``size`` tokens takes, or None when there is no such graph."""
        return self.layouts.get(size)

    def _meta(self, size: int) -> AttentionMetadata:
        layout = self.layouts[size]
        return AttentionMetadata(
            slot_mapping=self.slots[:size],
            block_tables=self.block_tables,
            seq_lens=self.seq_lens,
            query_start_loc=self.query_start,
            seq_lens_host=[],  # the host-side fields are not read on this path
            query_start_loc_host=[],
            max_seq_len=self.max_seq_len,
            max_query_len=size,
            decode_order=self.order[: layout.decode_rows],
            decode_seq_lens=self.decode_lens[: layout.decode_rows],
            extend_tiles=self.tiles[: layout.tiles],
            extend_config=self.configs[size],
            split_counters=self.split_counters,
        )

    def _forward(self, size: int) -> torch.Tensor:
        return self.model(self.input_ids[:size], self.positions[:size], self._meta(size))

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every size, largest first, all in one memory pool (a no-op without CUDA). The
        buffers hold no step (length-0 decode rows, padding tiles, slot -1): the warm-up runs read
        and write no KV cache."""
        if self.captured:
            self.graphs, self.outputs = capture_by_size(self.sizes, self._forward, self.device, warmups=2)

    def forward(
        self,
        size: int,
        inputs: dict[str, torch.Tensor],
        fill: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Run the step whose device inputs are ``inputs`` (the runner's packed fields, laid out by
        ``layout(size)``): hidden states [size, hidden], a static buffer the next call overwrites.
        ``fill = (rows, ids)`` overwrites those rows' input ids (tokens of a step still in flight)."""
        layout = self.layouts.get(size)
        if layout is None:
            raise ValueError(f"no mixed graph for {size} tokens (sizes: {self.sizes})")
        seqs = inputs["seq_lens"].shape[0]
        tables = inputs["block_tables"]
        self.input_ids[:size].copy_(inputs["input_ids"], non_blocking=True)
        if fill is not None:
            self.input_ids.index_copy_(0, fill[0], fill[1])
        self.positions[:size].copy_(inputs["positions"], non_blocking=True)
        self.slots[:size].copy_(inputs["slots"], non_blocking=True)
        self.seq_lens[:seqs].copy_(inputs["seq_lens"], non_blocking=True)
        self.query_start[: seqs + 1].copy_(inputs["query_start"], non_blocking=True)
        self.block_tables[:seqs, : tables.shape[1]].copy_(tables, non_blocking=True)
        self.decode_lens[: layout.decode_rows].copy_(inputs["decode_lens"], non_blocking=True)
        self.order[: layout.decode_rows].copy_(inputs["decode_order"], non_blocking=True)
        self.tiles[: layout.tiles].copy_(inputs["tiles"].view(-1, 2), non_blocking=True)
        if not self.captured:
            return self._forward(size)
        self.graphs[size].replay()
        return self.outputs[size]
