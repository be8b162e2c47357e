"""CUDA graphs for the eager steps (prompt chunks, mixed batches): everything but the attention.

A step with prompt tokens cannot replay a decode graph: its attention kernels' grids depend on
the chunk lengths. Run eagerly, its forward costs the host a Python call and a kernel launch per
op, a few hundred per step, which on a fast GPU takes longer than the GPU's work. Here the
forward is cut at each layer's attention (``DecoderModel.head_piece`` / ``middle_piece`` /
``tail_piece``): the pieces between attentions (norms, projections, MLP) read and write static
buffers and are captured once per padded token count; a step copies its token ids in, then
replays piece 0, runs layer 0's attention eagerly on this step's metadata, replays piece 1, and so
on. The eager part is one fused q/k-norm+RoPE+KV-store kernel and the attention kernels per
layer.

Weights are updated in place and the pieces touch no KV cache, so the graphs stay valid across
weight updates; they are dropped with the decode graphs on sleep and captured again on wake.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from rollout.models.layers.attention import AttentionMetadata


class PiecewiseGraphs:
    """The pieces of ``model``'s forward between attentions, captured for each of ``sizes`` token
    counts (``forward`` takes exactly one of them)."""

    def __init__(self, model: nn.Module, sizes: list[int], device: torch.device) -> None:
        if not sizes or min(sizes) < 1:
            raise ValueError(f"piecewise graph sizes must be >= 1, got {sizes}")
        self.decoder = model.model
        self.sizes = sorted(set(sizes))
        n = self.sizes[-1]
        attn = self.decoder.layers[0].self_attn
        qkv_width = attn.qkv_proj.weight.shape[0]
        hidden = self.decoder.embed_tokens.weight.shape[1]
        dtype = self.decoder.embed_tokens.weight.dtype
        # Static buffers the pieces read and write (rows past a step's token count are unused).
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.qkv = torch.zeros(n, qkv_width, dtype=dtype, device=device)
        self.residual = torch.zeros(n, hidden, dtype=dtype, device=device)
        self.attn = torch.zeros(n, attn.num_heads * attn.head_dim, dtype=dtype, device=device)
        self.hidden = torch.zeros(n, hidden, dtype=dtype, device=device)
        self.device = device
        self.graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}

    def _pieces(self, size: int) -> list[Callable[[], None]]:
        d = self.decoder
        ids, qkv, residual = self.input_ids[:size], self.qkv[:size], self.residual[:size]
        attn, hidden = self.attn[:size], self.hidden[:size]

        def head() -> None:
            q, r = d.head_piece(ids)
            qkv.copy_(q)
            residual.copy_(r)

        def middle(i: int) -> None:
            q, r = d.middle_piece(i, attn, residual)
            qkv.copy_(q)
            residual.copy_(r)

        def tail() -> None:
            hidden.copy_(d.tail_piece(attn, residual))

        middles = [lambda i=i: middle(i) for i in range(1, len(d.layers))]
        return [head, *middles, tail]

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every size, largest first, all in one memory pool: a piece's temporaries are dead
        when it ends (its results are in the static buffers), so every graph can reuse them."""
        pool = None
        for size in reversed(self.sizes):
            pieces = self._pieces(size)
            for piece in pieces:  # compile kernels and pick GEMM algorithms outside the capture
                piece()
            torch.cuda.synchronize(self.device)
            graphs = []
            for piece in pieces:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    piece()
                pool = graph.pool()
                graphs.append(graph)
            self.graphs[size] = graphs
        torch.cuda.synchronize(self.device)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """The model's forward on a step of ``len(input_ids)`` tokens (a captured size): hidden
        states [T, hidden], a view of a static buffer that the next call overwrites."""
        size = input_ids.shape[0]
        graphs = self.graphs.get(size)
        if graphs is None:
            raise ValueError(f"no piecewise graphs for {size} tokens (sizes: {self.sizes})")
        d = self.decoder
        self.input_ids[:size].copy_(input_ids, non_blocking=True)
        rope = d.rope_inputs(positions)
        qkv, attn = self.qkv[:size], self.attn[:size]
        graphs[0].replay()
        for i in range(len(d.layers)):
            attn.copy_(d.attention(i, qkv, rope, meta))
            graphs[i + 1].replay()
        return self.hidden[:size]
