"""Read a tensor into the GPU's L2 cache ahead of the kernel that needs it, in Triton.

A decode step's GEMMs are small (4-12 MB of weights per GEMM for Qwen3-0.6B) and reach only
0.8-1.6 TB/s from DRAM: too few bytes in flight per SM for their short lifetime. Read into L2 a
little earlier, by a few programs on a side stream while attention runs, their weights come from
L2 instead (``rollout/prefetch.py`` schedules it). The loads carry the ``evict_last`` policy (which
PTX does not combine with ``.cg``), so the streams of KV-cache lines that pass through L2
meanwhile are evicted before them.

Each program folds the words it read into one int32 sum stored in ``sink``: the loads have a use,
so the compiler keeps them, and a test can check that every word was read.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# int32 words per program and iteration: 32 KB in flight per program (128 B per thread at 8 warps);
# 128 programs keep ~4 MB in flight, about what the H100/H200 DRAM needs to run at full speed
_BLOCK = 8192
_WARPS = 8


@triton.jit
def _prefetch_kernel(src_ptr, sink_ptr, num_words, per_program, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    start = pid * per_program
    end = tl.minimum(start + per_program, num_words)
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for off in range(start, end, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        acc += tl.load(src_ptr + idx, mask=idx < end, other=0, eviction_policy="evict_last")
    tl.store(sink_ptr + pid, tl.sum(acc, axis=0))


def prefetch_l2(tensor: torch.Tensor, sink: torch.Tensor) -> int:
    """Launch ``len(sink)`` programs (fewer for a small tensor) that read every byte of ``tensor``
    (contiguous, a whole number of 4-byte words) with the ``evict_last`` policy; program p stores
    the wrapping int32 sum of its words in ``sink[p]``. Returns the number of programs launched."""
    if not tensor.is_contiguous() or tensor.numel() * tensor.element_size() % 4:
        raise ValueError(
            f"prefetch needs a contiguous tensor of whole 4-byte words, got {tuple(tensor.shape)} "
            f"{tensor.dtype} strides {tensor.stride()}"
        )
    if sink.dtype != torch.int32 or sink.dim() != 1 or not len(sink) or sink.device != tensor.device:
        raise ValueError(
            f"sink must be a non-empty 1-D int32 tensor on {tensor.device}, got {tuple(sink.shape)} "
            f"{sink.dtype} on {sink.device}"
        )
    words = tensor.view(-1).view(torch.int32)
    n = words.numel()
    if n == 0:
        return 0
    programs = min(len(sink), triton.cdiv(n, _BLOCK))
    per_program = triton.cdiv(triton.cdiv(n, programs), _BLOCK) * _BLOCK
    programs = triton.cdiv(n, per_program)
    _prefetch_kernel[(programs,)](words, sink, n, per_program, BLOCK=_BLOCK, num_warps=_WARPS)
    return programs
