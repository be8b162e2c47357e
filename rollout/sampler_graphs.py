"""Decode steps' sampling captured as CUDA graphs.

For each decode graph size, a small graph runs the fused sampling kernel
(``rollout.kernels.sampling``) over that graph's logits and packs the sampled ids and their
logprobs into one float64 [2, size] tensor for the step's host copy. It reads the per-row values
(temperature, greedy, seed, RNG offset, logprob mode) from one static device buffer per size, which
a step fills with ``SamplingRows.tensors(..., min_rows=size, out=buffer(size))``: one host-to-device
copy, as without graphs, or none on a steady step (``ModelRunner._sampling_tensors``).

The kernel is captured in its general form: noise drawn for every row and both distributions'
log-sum-exp kept. That gives the tokens and logprobs of the variants ``sample`` picks from host flags
(a greedy row's noise is masked out; its temperature is 1, so dividing by it is exact; a raw row
reads the raw log-sum-exp), so one graph per size serves every batch ``SamplingRows.fused_only``
admits. Logprobs may differ from an eager step's in the last bits: the kernel splits the vocabulary
into chunks by the padded size, not the batch's.

What it saves is host time per step: ``sample``'s allocations, its two Triton launches from Python
and the result packing (about 0.45 ms of a profiled 2.2 ms batch-1 step on the H100's host, stop 29),
for one graph launch.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from rollout.cuda_graphs import capture_by_size
from rollout.samplers.params import SamplingParams
from rollout.samplers.sampler import SamplerOutput, fused_kernel, fused_output
from rollout.samplers.tensors import SamplingTensors, effective_values, same_device


class GraphSample(NamedTuple):
    """One size's outputs, rows past the step's batch hold garbage."""

    token_ids: torch.Tensor  # [size] i64
    logprobs: torch.Tensor  # [size] f32, in each row's logprob mode
    lse: torch.Tensor  # [size] f32, of each row's logprob source
    packed: torch.Tensor  # [2, size] f64: token ids (exact below 2**53), logprobs


class SamplerGraphs:
    """Sampling over the logits of each decode graph size (``logits``: size -> [size, V] static
    logits, the decode graphs' outputs). With ``tokens_to`` (``DecodeGraphs.last_tokens``) a graph
    also copies its sampled ids there, for the next decode graph step's inputs."""

    def __init__(
        self,
        logits: dict[int, torch.Tensor],
        vocab_size: int,
        device: torch.device,
        tokens_to: torch.Tensor | None = None,
    ) -> None:
        for size, x in logits.items():
            if x.shape != (size, vocab_size) or not same_device(x.device, device):
                raise ValueError(
                    f"logits of size {size} must be [{size}, {vocab_size}] on {device}, "
                    f"got {tuple(x.shape)} on {x.device}"
                )
        if tokens_to is not None and (
            tokens_to.dtype != torch.long or tokens_to.dim() != 1 or tokens_to.shape[0] < max(logits)
        ):
            raise ValueError(
                f"tokens_to must be 1-D int64 with at least {max(logits)} rows, got "
                f"{tuple(tokens_to.shape)} {tokens_to.dtype}"
            )
        self.tokens_to = tokens_to
        self.logits = logits
        self.vocab_size = vocab_size
        self.device = device
        self.buffers = {
            size: torch.zeros(SamplingTensors.buffer_bytes(size), dtype=torch.uint8, device=device)
            for size in logits
        }
        # Without CUDA nothing is captured: each replay runs the kernel (Triton's interpreter) over
        # the same buffers (the CPU tests' path).
        self.captured = device.type == "cuda"
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, GraphSample] = {}
        self._views: dict[int, SamplingTensors] = {}

    def buffer(self, size: int) -> torch.Tensor:
        """The static buffer the graph of ``size`` reads its rows' values from."""
        return self.buffers[size]

    def tensors(self, size: int) -> SamplingTensors:
        """Every row of ``size`` greedy and raw, written to its buffer: the views the graph reads."""
        greedy = effective_values(SamplingParams(temperature=0.0), self.vocab_size)
        zeros = [0] * size
        out = self.buffers[size]
        return SamplingTensors.from_columns(
            [greedy] * size, zeros, zeros, [], [], self.vocab_size, self.device, min_rows=size, out=out
        )

    def run(self, size: int, t: SamplingTensors) -> GraphSample:
        """What the graph of ``size`` captures: sample every row of its logits under ``t``."""
        out = fused_kernel(self.logits[size], t, all_greedy=False, any_processed=True)
        packed = torch.stack([out.token_ids.double(), out.logprobs.double()])
        if self.tokens_to is not None:
            self.tokens_to[:size].copy_(out.token_ids)
        return GraphSample(out.token_ids, out.logprobs, out.lse, packed)

    def _run_size(self, size: int) -> GraphSample:
        return self.run(size, self._views[size])

    @torch.inference_mode()
    def capture(self) -> None:
        """Write every size's buffer (``tensors``), then capture the sizes in one memory pool of
        their own (``capture_by_size``; replays never overlap). Without CUDA only the buffers."""
        self._views = {size: self.tensors(size) for size in self.logits}
        if self.captured:
            self.graphs, self.outputs = capture_by_size(self.logits, self._run_size, self.device, warmups=1)

    def replay(self, size: int, rows: int, k: int) -> tuple[SamplerOutput, torch.Tensor]:
        """Sample the first ``rows`` rows of the graph of ``size`` (its buffer already holds their
        values) with ``k`` top logprobs; returns ``sample``'s output for them and the packed
        [2, size] ids and logprobs of every row (contiguous, for one device-to-host copy)."""
        if self.captured:
            self.graphs[size].replay()
        else:
            self.outputs[size] = self._run_size(size)
        s = self.outputs[size]
        out = fused_output(s.token_ids[:rows], s.logprobs[:rows], s.lse[:rows], self.logits[size][:rows], k)
        return out, s.packed
