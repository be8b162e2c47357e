"""Weights read into L2 one phase ahead of their GEMMs, on a side stream (opt-in, see RunnerConfig).

In a decode step layer i runs: qkv GEMM, attention, o_proj GEMM, norm, gate_up GEMM, SiLU-and-mul,
down GEMM. Once layer i's qkv GEMM is queued, a high-priority side stream reads into L2 the
weights of the four GEMMs that follow it (layer i's o_proj, gate_up and down, layer i + 1's qkv:
~30 MB for Qwen3-0.6B, within an H100's 50 MB L2) with ``kernels.prefetch.prefetch_l2``, a few
programs that run beside the attention kernel. The main stream waits for the side stream once, at
the end of the forward, so the prefetch adds no dependency to the step.

The hooks that issue it are registered only while the decode graphs are captured: inside a graph
the prefetch costs no host time, while eager steps (compute-bound prompt chunks) would pay four
launches per layer for nothing. Without CUDA (the CPU tests) the prefetch runs inline.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


class WeightPrefetch:
    """Prefetch plan for a ``DecoderForCausalLM``-shaped model (``model.model.layers``)."""

    def __init__(self, model: nn.Module, device: torch.device, num_programs: int) -> None:
        if num_programs < 1:
            raise ValueError(f"num_programs must be >= 1, got {num_programs}")
        self.decoder = model.model
        self.device = device
        self.stream = torch.cuda.Stream(device, priority=-1) if device.type == "cuda" else None
        self.sink = torch.zeros(num_programs, dtype=torch.int32, device=device)
        self.launches = 0  # prefetch launches issued (tests)

    def _targets(self, i: int) -> list[torch.Tensor]:
        """The weights read while layer i's attention runs (looked up now: ``sleep`` moves them)."""
        layers = self.decoder.layers
        layer = layers[i]
        out = [layer.self_attn.o_proj.weight, layer.mlp.gate_up_proj.weight, layer.mlp.down_proj.weight]
        if i + 1 < len(layers):
            out.append(layers[i + 1].self_attn.qkv_proj.weight)
        return out

    def _start(self, i: int) -> None:
        from rollout.kernels.prefetch import prefetch_l2

        side = contextlib.nullcontext()  # without CUDA: inline
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            side = torch.cuda.stream(self.stream)
        with side:
            for w in self._targets(i):
                prefetch_l2(w.detach(), self.sink)
                self.launches += 1

    def _join(self) -> None:
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)

    @contextlib.contextmanager
    def hooks(self) -> Iterator[None]:
        """Within the block, every forward of the model issues the prefetch (the decode graphs'
        capture, or a test's forward)."""
        handles = [
            layer.self_attn.qkv_proj.register_forward_hook(lambda *_, i=i: self._start(i))
            for i, layer in enumerate(self.decoder.layers)
        ]
        handles.append(self.decoder.register_forward_hook(lambda *_: self._join()))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
