"""A decode graph step's inputs unpacked on the device, inside the graph (reference:
``unpack_decode_inputs_ref``).

The host packs a step of ``size`` rows into one int64 array (``rollout.step_inputs``, graph
layout) that reaches the device in one copy, into a static staging buffer:

====================  ==========  ==================================================================
offset                entries     what
====================  ==========  ==================================================================
0                     size        input token ids (0 where the row's token is still on the device)
size                  size        positions (the graph reads them here)
2 * size              size        KV slots (the graph reads them here; -1 on padding rows)
3 * size              size        sequence lengths (0 on padding rows)
4 * size              size        decode order (``AttentionMetadata.decode_order``)
5 * size              size        input source: -1, or the row of ``last_tokens`` that holds the
                                  row's input token (sampled by the step still in flight)
6 * size              1           block table width ``w``
6 * size + 1          size * w    block tables, row-major
====================  ==========  ==================================================================

One program per row writes what the graph reads in its own dtypes: the input id (from
``last_tokens`` where the source says so), the length and decode order as int32, and the row's
``w`` block table entries as int32 (entries past ``w`` keep older values; attention never reads
past a sequence's length). Captured as the graph's first node, it lets a step's inputs arrive in
one copy, where a step otherwise launches six copies and the in-flight token fill (two more
launches) from the host before each replay.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK_W = 128  # block table entries per iteration


@triton.jit
def _unpack_kernel(
    stage_ptr,
    last_ptr,
    ids_ptr,
    seq_lens_ptr,
    order_ptr,
    tables_ptr,
    stride_tables,
    size,
    BLOCK_W: tl.constexpr,
):
    row = tl.program_id(0)
    src = tl.load(stage_ptr + 5 * size + row)
    token = tl.load(stage_ptr + row)
    if src >= 0:
        token = tl.load(last_ptr + src)
    tl.store(ids_ptr + row, token)
    tl.store(seq_lens_ptr + row, tl.load(stage_ptr + 3 * size + row).to(tl.int32))
    tl.store(order_ptr + row, tl.load(stage_ptr + 4 * size + row).to(tl.int32))
    width = tl.load(stage_ptr + 6 * size)
    first = stage_ptr + 6 * size + 1 + row * width
    for c in range(0, width, BLOCK_W):
        cols = c + tl.arange(0, BLOCK_W)
        mask = cols < width
        entries = tl.load(first + cols, mask=mask)
        tl.store(tables_ptr + row * stride_tables + cols, entries.to(tl.int32), mask=mask)


def staged_entries(size: int, width: int) -> int:
    """Entries of the graph layout for ``size`` rows and block tables ``width`` wide."""
    return 6 * size + 1 + size * width


def _check(
    stage: torch.Tensor,
    size: int,
    last_tokens: torch.Tensor,
    input_ids: torch.Tensor,
    seq_lens: torch.Tensor,
    order: torch.Tensor,
    block_tables: torch.Tensor,
) -> None:
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    device = stage.device
    wants = (
        ("stage", stage, torch.int64, 6 * size + 1),
        ("last_tokens", last_tokens, torch.int64, 1),
        ("input_ids", input_ids, torch.int64, size),
        ("seq_lens", seq_lens, torch.int32, size),
        ("order", order, torch.int32, size),
    )
    for name, t, dtype, rows in wants:
        if t.dim() != 1 or t.dtype != dtype or not t.is_contiguous() or t.device != device:
            raise ValueError(
                f"{name} must be a contiguous 1-D {dtype} tensor on {device}, got {tuple(t.shape)} "
                f"{t.dtype} on {t.device} strides {t.stride()}"
            )
        if t.shape[0] < rows:
            raise ValueError(f"{name} has {t.shape[0]} entries, fewer than {rows}")
    if (
        block_tables.dim() != 2
        or block_tables.dtype != torch.int32
        or block_tables.stride(1) != 1
        or block_tables.device != device
        or block_tables.shape[0] < size
    ):
        raise ValueError(
            f"block_tables must be [>= {size}, w] int32 on {device} with unit column stride, got "
            f"{tuple(block_tables.shape)} {block_tables.dtype} on {block_tables.device} "
            f"strides {block_tables.stride()}"
        )


def unpack_decode_inputs(
    stage: torch.Tensor,
    size: int,
    last_tokens: torch.Tensor,
    input_ids: torch.Tensor,
    seq_lens: torch.Tensor,
    order: torch.Tensor,
    block_tables: torch.Tensor,
) -> None:
    """Write rows ``0..size-1`` of ``input_ids`` (i64), ``seq_lens`` and ``order`` (i32) and the
    leading ``w`` columns of ``block_tables`` (i32) from ``stage``, laid out as the module docstring
    says. The values (the width, the sources) are not checked: reading them would sync the device;
    the host checks them when it packs (``DecodeGraphs.replay_staged``)."""
    _check(stage, size, last_tokens, input_ids, seq_lens, order, block_tables)
    _unpack_kernel[(size,)](
        stage,
        last_tokens,
        input_ids,
        seq_lens,
        order,
        block_tables,
        block_tables.stride(0),
        size,
        BLOCK_W=_BLOCK_W,
        num_warps=1,
    )


def unpack_decode_inputs_ref(
    stage: torch.Tensor,
    size: int,
    last_tokens: torch.Tensor,
    input_ids: torch.Tensor,
    seq_lens: torch.Tensor,
    order: torch.Tensor,
    block_tables: torch.Tensor,
) -> None:
    """``unpack_decode_inputs`` in torch ops (the tests' reference)."""
    _check(stage, size, last_tokens, input_ids, seq_lens, order, block_tables)
    s = size
    src = stage[5 * s : 6 * s]
    staged = stage[:s]
    from_last = last_tokens[src.clamp(min=0)]
    input_ids[:s] = torch.where(src >= 0, from_last, staged)
    seq_lens[:s] = stage[3 * s : 4 * s].to(torch.int32)
    order[:s] = stage[4 * s : 5 * s].to(torch.int32)
    width = int(stage[6 * s])
    block_tables[:s, :width] = stage[6 * s + 1 : 6 * s + 1 + s * width].view(s, width).to(torch.int32)
