"""One step's inputs on the host: token ids, positions, KV slots, block tables and the rest of a
scheduled batch, packed into one int64 buffer so that they reach the device in one copy, and the
attention metadata an eager forward builds from that copy. Also the profile step's layout (the
memory profile's largest step)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import chain

import numpy as np
import torch

from rollout.cuda_graphs import padded_rows
from rollout.mixed_graphs import MixedLayout
from rollout.models.layers.attention import AttentionMetadata, decode_order
from rollout.request import Request
from rollout.scheduler import ScheduledBatch, ScheduledRequest


def prepare_inputs(
    batch: ScheduledBatch,
    num_rows: int,
    block_size: int,
    device: torch.device,
    prev_row_of: Callable[[Request], int] | None = None,
    pad_rows: bool = False,
    mixed: MixedLayout | None = None,
    graph_layout: bool = False,
) -> HostInputs:
    """Host arrays of the step, packed in one (pinned on CUDA) int64 buffer. With num_rows >
    num_tokens the extra rows are padding: token 0 at position 0, stored nowhere (slot -1); in a
    decode-only step (a graph's padded size, or an eager one) each is also a padding sequence of
    length 0, in a mixed step no sequence owns them (the attention kernels leave them
    unwritten). With ``pad_rows`` the logits rows are padded to ``padded_rows`` entries
    (repeating row 0) and never marked as leading. With ``mixed`` (a step with prompt tokens for
    a mixed graph) the decode rows' lengths and order cover ``mixed.decode_rows`` rows and the
    extend kernel's tile list is built. With ``graph_layout`` (a decode graph step of ``num_rows``
    rows) the buffer begins with the layout ``kernels.graph_inputs`` unpacks: the in-flight tokens
    as a source row per input row instead of placeholder lists, and the block tables' width."""
    bs = block_size
    reqs = batch.requests
    num_seqs = len(reqs)
    decode_only = batch.num_tokens == num_seqs
    if graph_layout and (not decode_only or mixed is not None or pad_rows):
        raise ValueError(
            f"the graph layout is for decode-only steps, got {batch.num_tokens} tokens "
            f"for {num_seqs} sequences"
        )
    padded_seqs = num_seqs + (num_rows - batch.num_tokens) if decode_only else num_seqs
    block_lists = [s.request.block_ids for s in reqs]
    num_blocks = [len(blocks) for blocks in block_lists]
    max_blocks = max(num_blocks)
    samples = [s.sample for s in reqs]
    num_samples = samples.count(True)
    ph_dst: list[int] = []
    ph_src: list[int] = []
    if prev_row_of is not None:
        for i, s in enumerate(reqs):
            # a placeholder is always the last row of its request (one pending token at most)
            if s.start + s.num_new_tokens > s.request.num_tokens:
                ph_src.append(prev_row_of(s.request))
                ph_dst.append(-1 - i)  # fixed up below, once row offsets are known
    num_logits_rows = padded_rows(num_samples) if pad_rows and num_samples else num_samples
    host = HostInputs.allocate(
        num_rows,
        padded_seqs,
        num_seqs,
        max_blocks,
        num_logits_rows,
        0 if graph_layout else len(ph_dst),
        device,
        mixed,
        graph_layout,
    )
    host.num_placeholders = len(ph_dst)
    host.num_samples = num_samples  # the padding rows (row 0 again) are sliced off the logits
    v = host.views_np()
    table = v["block_tables"]
    if num_seqs <= 8:
        for i, blocks in enumerate(block_lists):
            table[i, : len(blocks)] = blocks
    else:  # every block id in one flat array, scattered into the rows' leading columns
        flat = np.fromiter(chain.from_iterable(block_lists), dtype=np.int64, count=sum(num_blocks))
        table[:num_seqs][np.arange(max_blocks) < np.array(num_blocks)[:, None]] = flat
    if decode_only:  # one row per sequence
        starts = [s.start for s in reqs]
        # the token at each start (0 for a placeholder: its token is still on the device)
        v["input_ids"][:num_seqs] = [
            t[st] if st < len(t) else 0
            for t, st in zip([s.request.token_ids for s in reqs], starts, strict=True)
        ]
        v["positions"][:num_seqs] = starts
        v["slots"][:num_seqs] = [
            blocks[st // bs] * bs + st % bs for blocks, st in zip(block_lists, starts, strict=True)
        ]
        np.add(v["positions"][:num_seqs], 1, out=v["seq_lens"][:num_seqs])
        v["query_start"][:] = range(num_seqs + 1)
        rows_of = np.arange(num_seqs, dtype=np.int64)
        if num_samples == num_seqs:
            v["logits_rows"][:num_samples] = rows_of
            host.samples_lead = not pad_rows
        else:
            v["logits_rows"][:num_samples] = [i for i, sample in enumerate(samples) if sample]
        max_query_len = 1
    else:  # whole-batch array ops; per sequence only its token slice is taken
        starts = np.fromiter((s.start for s in reqs), np.int64, num_seqs)
        lens = np.fromiter((s.num_new_tokens for s in reqs), np.int64, num_seqs)
        qs = v["query_start"]
        np.cumsum(lens, out=qs[1:])
        total = batch.num_tokens
        pos = np.arange(total) + np.repeat(starts - qs[:-1], lens)
        v["positions"][:total] = pos
        v["slots"][:total] = table[np.repeat(np.arange(num_seqs), lens), pos // bs] * bs + pos % bs
        np.add(starts, lens, out=v["seq_lens"][:num_seqs])
        v["input_ids"][:total] = np.fromiter(
            chain.from_iterable(new_token_ids(s) for s in reqs), np.int64, total
        )
        rows_of = qs[1:] - 1
        v["logits_rows"][:num_samples] = rows_of[np.array(samples)]
        max_query_len = int(lens.max())
        not_one = np.flatnonzero(lens != 1)
        host.num_decodes = int(not_one[0]) if len(not_one) else num_seqs
        if mixed is not None:  # decode rows past the decodes: length 0, in row order
            from rollout.kernels.prefill_attention import fill_extend_tiles  # (imports Triton)

            nd = host.num_decodes
            v["decode_lens"][:nd] = v["seq_lens"][:nd]
            v["decode_order"][nd:] = np.arange(nd, mixed.decode_rows)
            fill_extend_tiles(lens, nd, mixed.tile_positions, v["tiles"])
    nd = padded_seqs if decode_only else host.num_decodes
    v["decode_order"][:nd] = decode_order(v["seq_lens"][:nd])
    if graph_layout:
        v["table_width"][0] = max_blocks
        v["input_src"][:] = -1
        if ph_dst:
            v["input_src"][rows_of[[-1 - d for d in ph_dst]]] = ph_src
    elif ph_dst:
        v["placeholder_dst"][:] = rows_of[[-1 - d for d in ph_dst]]
        v["placeholder_src"][:] = ph_src
    host.seq_lens_host = v["seq_lens"].tolist()
    host.query_start_host = v["query_start"].tolist()
    host.max_query_len = max_query_len
    return host


def device_metadata(
    host: HostInputs, v: dict[str, torch.Tensor], split_counters: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """Input ids, positions and attention metadata of an eager step from its inputs' device copy
    (``HostInputs.views``)."""
    qs = host.query_start_host
    meta = AttentionMetadata(
        slot_mapping=v["slots"],
        block_tables=v["block_tables"].to(torch.int32),
        seq_lens=v["seq_lens"].to(torch.int32),
        query_start_loc=v["query_start"].to(torch.int32),
        seq_lens_host=host.seq_lens_host,
        query_start_loc_host=qs,
        max_seq_len=max(host.seq_lens_host),
        max_query_len=host.max_query_len,
        num_decodes=host.num_decodes,
        decode_order=v["decode_order"].to(torch.int32),
        split_counters=split_counters,
    )
    return v["input_ids"], v["positions"], meta


# In this order: a decode graph step's buffer begins with kernels.graph_inputs' layout.
_FIELDS = (
    "input_ids",
    "positions",
    "slots",
    "seq_lens",
    "decode_order",
    "input_src",
    "table_width",
    "block_tables",
    "query_start",
    "logits_rows",
    "placeholder_dst",
    "placeholder_src",
    "decode_lens",
    "tiles",
)


@dataclass(eq=False)
class HostInputs:
    """One step's inputs on the host, padded to ``num_rows`` tokens/sequences for graph replay,
    packed in one int64 buffer so they travel in one host-to-device copy."""

    ints: torch.Tensor  # the packed buffer (pinned on CUDA)
    layout: dict[str, tuple[int, int, tuple[int, ...]]]  # field -> (offset, size, shape)
    num_placeholders: int  # rows whose input token the device fills in (sampled by the step in flight)
    seq_lens_host: list[int] = field(default_factory=list)
    query_start_host: list[int] = field(default_factory=list)
    max_query_len: int = 1
    num_samples: int = 0  # rows that sample
    samples_lead: bool = False  # they are rows 0..num_samples-1 (a decode batch where every row samples)
    num_decodes: int = 0  # leading sequences with one query row (see AttentionMetadata.num_decodes)

    @classmethod
    def allocate(
        cls,
        num_rows: int,
        padded_seqs: int,
        num_seqs: int,
        max_blocks: int,
        num_logits_rows: int,
        num_placeholders: int,
        device: torch.device,
        mixed: MixedLayout | None = None,
        graph_layout: bool = False,
    ) -> HostInputs:
        order_rows = mixed.decode_rows if mixed is not None else padded_seqs
        shapes = (
            (num_rows,),  # input_ids
            (num_rows,),  # positions
            (num_rows,),  # slots
            (padded_seqs,),  # seq_lens
            (order_rows,),  # decode_order (its leading num_decodes entries in a mixed step)
            (num_rows if graph_layout else 0,),  # input_src (graph layout)
            (1 if graph_layout else 0,),  # table_width (graph layout)
            (padded_seqs, max_blocks),  # block_tables
            (num_seqs + 1,),  # query_start
            (num_logits_rows,),  # logits_rows
            (num_placeholders,),  # placeholder_dst
            (num_placeholders,),  # placeholder_src
            (mixed.decode_rows if mixed is not None else 0,),  # decode_lens (mixed graphs)
            (mixed.tiles, 2) if mixed is not None else (0,),  # tiles (mixed graphs)
        )
        layout = {}
        offset = 0
        for name, shape in zip(_FIELDS, shapes, strict=True):
            size = shape[0] * shape[1] if len(shape) == 2 else shape[0]
            layout[name] = (offset, size, shape)
            offset += size
        ints = torch.empty(offset, dtype=torch.int64, pin_memory=device.type == "cuda")
        host = cls(ints, layout, num_placeholders)
        a = ints.numpy()
        a[:] = 0
        # padding rows: no slot (nothing stored)
        o, n, _ = layout["slots"]
        a[o : o + n] = -1
        return host

    def views_np(self) -> dict[str, np.ndarray]:
        a = self.ints.numpy()
        return {k: a[o : o + n].reshape(shape) for k, (o, n, shape) in self.layout.items()}

    def views(self, ints: torch.Tensor) -> dict[str, torch.Tensor]:
        # One split op instead of a slice per field: each torch op costs microseconds of host time.
        parts = torch.split_with_sizes(ints, [n for _, n, _ in self.layout.values()])
        v = dict(zip(self.layout, parts, strict=True))
        v["block_tables"] = v["block_tables"].view(self.layout["block_tables"][2])
        v["tiles"] = v["tiles"].view(self.layout["tiles"][2])
        return v


def new_token_ids(s: ScheduledRequest) -> list[int]:
    """The input ids of a scheduled request's rows: its tokens from ``start``, and 0 for a
    placeholder (a token sampled by the step still in flight; the device fills it in)."""
    tokens = s.request.token_ids[s.start : s.start + s.num_new_tokens]
    return tokens if len(tokens) == s.num_new_tokens else tokens + [0] * (s.num_new_tokens - len(tokens))


def profile_blocks(num_tokens: int, max_model_len: int, block_size: int) -> int:
    """Blocks the profile step's prompts fill (see ``profile_step_meta``)."""
    seq_len = min(num_tokens, max_model_len)
    full, rest = divmod(num_tokens, seq_len)
    return full * -(-seq_len // block_size) + -(-rest // block_size)


def profile_step_meta(
    num_tokens: int, max_model_len: int, block_size: int, device: torch.device
) -> tuple[AttentionMetadata, torch.Tensor]:
    """Metadata and positions of ``num_tokens`` fresh tokens as prompts of ``max_model_len`` tokens
    (the last one shorter), prompt i in the next blocks after prompt i - 1's: a step's token budget
    may exceed the longest sequence, and a step of that budget holds several prompts."""
    seq_len = min(num_tokens, max_model_len)
    full, rest = divmod(num_tokens, seq_len)
    lens = [seq_len] * full + ([rest] if rest else [])
    per_seq = -(-seq_len // block_size)
    tokens = torch.arange(num_tokens, device=device)
    positions = tokens % seq_len
    tables = torch.arange(len(lens) * per_seq, dtype=torch.int32, device=device).view(len(lens), per_seq)
    # the last prompt may fill fewer blocks: its table's tail points at block 0 (never read)
    tables.masked_fill_(tables >= profile_blocks(num_tokens, max_model_len, block_size), 0)
    starts = [i * seq_len for i in range(len(lens))] + [num_tokens]
    meta = AttentionMetadata(
        slot_mapping=tokens // seq_len * (per_seq * block_size) + positions,
        block_tables=tables,
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens_host=lens,
        query_start_loc_host=starts,
        max_seq_len=seq_len,
        max_query_len=seq_len,
    )
    return meta, positions
