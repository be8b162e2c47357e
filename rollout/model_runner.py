"""Runs one scheduled step on the model: builds the inputs and attention metadata, runs the forward,
computes logits only for rows that need them, and samples."""

from __future__ import annotations

import gc
import math
from dataclasses import dataclass, field
from itertools import chain

import numpy as np
import torch

from rollout.config import CacheConfig, RunnerConfig, SchedulerConfig
from rollout.cuda_graphs import DecodeGraphs, eager_token_sizes, padded_rows, padded_tokens
from rollout.mixed_graphs import MixedGraphs, MixedLayout
from rollout.models.config import ModelConfig
from rollout.models.layers.attention import AttentionMetadata, decode_order
from rollout.models.loader import load_model
from rollout.piecewise_graphs import PiecewiseGraphs
from rollout.request import Request
from rollout.samplers.params import MAX_LOGPROBS, SamplingParams
from rollout.samplers.sampler import SamplerOutput, prompt_logprobs, sample
from rollout.samplers.tensors import (
    LogitBiasColumns,
    PenaltyHistory,
    RowValues,
    SamplingTensors,
    effective_values,
    to_device_async,
)
from rollout.scheduler import ScheduledBatch, ScheduledRequest


@dataclass
class RunnerOutput:
    """Host-side results of one step, for the requests of the batch that sampled, in batch order."""

    token_ids: list[int]  # the sampled token of each sampling request
    logprobs: list[float]  # its logprob (in the request's logprobs_mode)
    top_logprobs: list[dict[int, float] | None]  # top-k {token: logprob} when the request asked for k > 0
    # request_id -> (logprob of each next prompt token, its top-k dict or None) for this step's chunk
    prompt_logprobs: dict[str, tuple[list[float], list[dict[int, float] | None]]] = field(
        default_factory=dict
    )


class ModelRunner:
    """Owns the model weights and the KV cache on one device."""

    def __init__(
        self,
        model_config: ModelConfig,
        cache_config: CacheConfig,
        scheduler_config: SchedulerConfig,
        device: torch.device,
        load_format: str = "auto",
        seed: int = 0,
        runner_config: RunnerConfig | None = None,
    ) -> None:
        self.runner_config = runner_config or RunnerConfig()
        self.model_config = model_config
        self.cache_config = cache_config
        self.scheduler_config = scheduler_config
        self.device = device
        self.dtype = model_config.dtype
        self.block_size = cache_config.block_size
        self.model = load_model(model_config, device, load_format=load_format, seed=seed)
        backend = self.runner_config.attention_backend
        if backend == "auto":
            backend = "triton" if device.type == "cuda" else "torch"
        for layer in self.model.attention_layers():
            layer.backend = backend
        # Eager steps of the triton backend run the forward on a padded token count (padding rows:
        # slot -1, no sequence), at most the profiled step's; the torch attention path has none.
        self._eager_token_cap = scheduler_config.max_num_batched_tokens if backend == "triton" else None
        if backend == "triton" and self.runner_config.fused_ops:
            for module in self.model.modules():
                if hasattr(module, "fused"):
                    module.fused = True
        self.vocab_size = model_config.vocab_size
        self._values_cache: dict[int, tuple[SamplingParams, RowValues]] = {}  # see _effective_values
        # the last sampling step's rows, tensors and sampled tokens (see _sampling_tensors)
        self._last_sampling: tuple[_SamplingRows, SamplingTensors, torch.Tensor | None] | None = None
        self.profiled_step_bytes: int | None = None  # set by the GPU memory profile (bytes)
        self.num_blocks = self._decide_num_blocks()
        self.kv_cache = self._allocate_kv_cache(self.num_blocks)
        self._bind_kv_cache(self.kv_cache)
        self.graphs: DecodeGraphs | None = None
        self.pieces: PiecewiseGraphs | None = None
        self.mixed: MixedGraphs | None = None
        if self.attention_backend == "triton" and device.type == "cuda":
            self._compile_extend_kernels()
        self.capture_graphs()
        if device.type == "cuda":
            # Move everything alive now (torch, transformers, the model's modules: millions of
            # objects) out of the cyclic GC's reach: full collections over them cost 100+ ms and
            # came every few steps (W1 on the H100: 7.1K -> 18.3K tok/s with the heap frozen).
            gc.collect()
            gc.freeze()

    def capture_graphs(self) -> None:
        """Capture the decode graphs and the eager steps' mixed and piecewise graphs (when enabled)
        over the current weights and KV cache storage. Mixed graphs are built on any device with the
        triton backend (without CUDA they run uncaptured: the CPU tests' path)."""
        self.release_graphs()
        rc = self.runner_config
        if self.attention_backend != "triton" or not rc.cuda_graphs:
            return
        max_len = self.model_config.max_model_len
        max_blocks = -(-max_len // self.block_size)
        assert self._eager_token_cap is not None
        sizes = eager_token_sizes(self._eager_token_cap)
        mixed_sizes = [s for s in sizes if 2 <= s <= rc.max_mixed_graph_tokens]
        if mixed_sizes:
            max_seqs = self.scheduler_config.max_num_seqs
            self.mixed = MixedGraphs(self.model, mixed_sizes, max_seqs, max_blocks, max_len, self.device)
            self.mixed.capture()
        if self.device.type != "cuda":
            return
        max_batch = min(rc.max_graph_batch, self.scheduler_config.max_num_seqs)
        self.graphs = DecodeGraphs(self.model, max_batch, max_blocks, max_len, self.device)
        self.graphs.capture()
        piece_sizes = [s for s in sizes if s <= rc.max_piecewise_tokens and s not in mixed_sizes]
        if piece_sizes:
            self.pieces = PiecewiseGraphs(self.model, piece_sizes, self.device)
            self.pieces.capture()

    @torch.inference_mode()
    def _compile_extend_kernels(self) -> None:
        """Compile the extend kernel's variants (its tile config follows the step's longest chunk)
        now rather than mid-run, where each new one cost a step 0.7 s on the H200."""
        from rollout.kernels.prefill_attention import extend_attention

        cap = self._eager_token_cap or 1
        layers = {attn.sliding_window is None: attn for attn in self.model.attention_layers()}.values()
        for attn in layers:
            assert attn.k_cache is not None and attn.v_cache is not None
            for chunk in sorted({min(n, cap) for n in (16, 32, 64, 128, 2048)}):
                q = torch.zeros(chunk, attn.num_heads, attn.head_dim, dtype=self.dtype, device=self.device)
                idx = dict(dtype=torch.int32, device=self.device)
                tables = torch.zeros(1, -(-chunk // self.block_size), **idx)
                seq_lens, starts = torch.tensor([chunk], **idx), torch.tensor([0, chunk], **idx)
                extend_attention(
                    q,
                    attn.k_cache,
                    attn.v_cache,
                    tables,
                    seq_lens,
                    starts,
                    chunk,
                    attn.scale,
                    attn.sliding_window,
                )

    def release_graphs(self) -> None:
        """Drop every captured graph (their memory pools go with them)."""
        self.graphs = None
        self.pieces = None
        self.mixed = None

    @property
    def attention_backend(self) -> str:
        return self.model.attention_layers()[0].backend

    # ---- KV cache ---------------------------------------------------------------------------
    def block_bytes(self) -> int:
        mc = self.model_config
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * mc.num_layers * self.block_size * mc.num_kv_heads * mc.head_dim * itemsize

    def _allocate_kv_cache(self, num_blocks: int) -> torch.Tensor:
        mc = self.model_config
        shape = (mc.num_layers, 2, num_blocks, self.block_size, mc.num_kv_heads, mc.head_dim)
        if self.device.type != "cuda":
            return torch.zeros(shape, dtype=self.dtype, device=self.device)
        # A segment of its own, so that sleep gives all of it back: with the cache emptied first
        # the allocator cannot carve the KV cache out of a cached segment that other tensors then
        # share, and sized to a whole number of the allocator's 2 MiB pages it leaves no remainder
        # that a later tensor could take (either would pin the segment after the cache is freed).
        torch.cuda.empty_cache()
        numel = math.prod(shape)
        page = (2 << 20) // self.dtype.itemsize
        flat = torch.zeros(-(-numel // page) * page, dtype=self.dtype, device=self.device)
        return flat[:numel].view(shape)

    def _bind_kv_cache(self, kv_cache: torch.Tensor | None) -> None:
        """Point every attention layer at its slice of ``kv_cache`` (None: drop the references)."""
        layers = self.model.attention_layers()
        for i, layer in enumerate(layers):
            layer.k_cache, layer.v_cache = (None, None) if kv_cache is None else kv_cache[i]

    def _decide_num_blocks(self) -> int:
        cc = self.cache_config
        if cc.num_blocks is not None:
            return cc.num_blocks
        if self.device.type != "cuda":
            num = cc.cpu_kv_cache_bytes // self.block_bytes()
        else:
            num = self._profile_gpu_blocks()
        if num < 1:
            raise ValueError(
                f"KV cache budget leaves no block of {self.block_bytes()} bytes; raise the budget"
            )
        return int(num)

    @torch.inference_mode()
    def _profile_gpu_blocks(self) -> int:
        """Run the largest step once on a scratch cache, then give the KV cache what memory is left
        under ``gpu_memory_utilization`` of the card."""
        num_tokens = self.scheduler_config.max_num_batched_tokens
        scratch_blocks = _profile_blocks(num_tokens, self.model_config.max_model_len, self.block_size)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        self._bind_kv_cache(self._allocate_kv_cache(scratch_blocks))
        base = torch.cuda.memory_allocated(self.device)
        self.profile_step(num_tokens)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        self.profiled_step_bytes = peak - base  # what a step may take beyond weights and KV cache
        self._bind_kv_cache(None)
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        outside_torch = total - free - torch.cuda.memory_reserved(self.device)
        budget = total * self.cache_config.gpu_memory_utilization - peak - outside_torch
        return int(budget // self.block_bytes())

    @torch.inference_mode()
    def profile_step(self, num_tokens: int) -> SamplerOutput:
        """The most memory-hungry step, for the KV budget's profile: ``num_tokens`` prompt tokens
        (prompts of at most ``max_model_len`` tokens: a step holds several) through the forward on
        the bound cache, then ``max_num_seqs`` rows sampled the torch sampler's costliest way:
        top-p's full sort, min-p, penalties ([rows, vocab] counts and seen masks) and processed top
        logprobs, each a [rows, vocab] fp32 temporary or more."""
        n = min(self.scheduler_config.max_num_seqs, num_tokens)
        ids = torch.zeros(num_tokens, dtype=torch.long, device=self.device)
        meta, positions = _profile_step_meta(
            num_tokens, self.model_config.max_model_len, self.block_size, self.device
        )
        hidden = self.model(ids, positions, meta)
        logits = self.model.compute_logits(hidden[:n])
        del hidden
        params = SamplingParams(
            top_p=0.9,
            min_p=0.01,
            repetition_penalty=1.1,
            frequency_penalty=0.1,
            logprobs=MAX_LOGPROBS,
            logprobs_mode="processed",
        )
        row = effective_values(params, self.vocab_size)
        history = PenaltyHistory(list(range(n)), [1] * n, list(range(n)), [2] * n)
        tensors = SamplingTensors.from_columns(
            [row] * n, list(range(n)), [0] * n, [], [], self.vocab_size, self.device, history
        )
        return sample(logits, tensors, use_kernel=False)

    # ---- one step ---------------------------------------------------------------------------
    def execute(self, batch: ScheduledBatch) -> RunnerOutput:
        """Run one step and wait for its results (``launch`` + ``collect``)."""
        return self.collect(self.launch(batch))

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch, prev: StepHandle | None = None) -> StepHandle:
        """Enqueue one step on the device and return without waiting for it.

        Rows whose input token is not known on the host yet (a token sampled by ``prev``, the step
        still running: the request's ``num_pending`` placeholder) take it from ``prev``'s device
        output, so the step can be queued before ``prev``'s results reach the host.
        """
        rows, prompt_rows = self._sampling_rows(batch, prev)
        graph_size = None
        if self.graphs is not None and batch.num_tokens == len(batch.requests):  # decode only
            graph_size = self.graphs.padded_size(len(batch.requests))
        dev = self.device
        # eager steps on CUDA run the LM head on a padded row count (see padded_rows)
        pad_rows = graph_size is None and dev.type == "cuda"
        num_rows = graph_size or batch.num_tokens
        if graph_size is None and self._eager_token_cap is not None:  # and the forward (see __init__)
            num_rows = padded_tokens(num_rows, self._eager_token_cap)
        mixed = None  # a step with prompt tokens of a mixed graph's size
        if self.mixed is not None and batch.num_tokens > len(batch.requests):
            mixed = self.mixed.layout(num_rows)
        host = self._prepare(batch, num_rows, prev, pad_rows, mixed)
        ints = host.ints.to(dev, non_blocking=True)
        v = host.views(ints)
        fill = None
        if host.num_placeholders:
            assert prev is not None and prev.token_ids is not None
            fill = (v["placeholder_dst"], prev.token_ids.index_select(0, v["placeholder_src"]))
        graph_logits = None
        if graph_size is not None:
            assert self.graphs is not None
            hidden, graph_logits = self.graphs.replay(
                graph_size,
                v["input_ids"],
                v["positions"],
                v["slots"],
                v["seq_lens"],
                v["block_tables"],
                v["decode_order"],
                fill=fill,
            )
        elif mixed is not None:
            assert self.mixed is not None
            hidden = self.mixed.forward(num_rows, v, fill)
        else:
            ids, positions, meta = self._to_device(host, v)
            if fill is not None:
                ids.index_copy_(0, fill[0], fill[1])
            if self.pieces is not None and num_rows in self.pieces.graphs:
                hidden = self.pieces.forward(ids, positions, meta)
            else:
                hidden = self.model(ids, positions, meta)
        handle = StepHandle(batch=batch)
        if rows.seeds:
            n, lead = host.num_samples, host.samples_lead  # lead: rows 0..n-1 sample (a view)
            if graph_logits is not None:  # the graph ran the LM head on its padded batch
                logits = graph_logits[:n] if lead else graph_logits.index_select(0, v["logits_rows"])
            else:
                rows_hidden = hidden[:n] if lead else hidden.index_select(0, v["logits_rows"])
                logits = self.model.compute_logits(rows_hidden)[:n]
            out = sample(logits, self._sampling_tensors(rows, prev))
            del logits  # not held while prompt logprobs take their own [rows, vocab] logits
            assert self._last_sampling is not None
            self._last_sampling = (*self._last_sampling[:2], out.token_ids)
            handle.token_ids = out.token_ids
            # one device-to-host copy for ids and logprobs (ids < 2**24 are exact in float64)
            packed = torch.stack([out.token_ids.double(), out.logprobs.double()])
            handle.host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=dev.type == "cuda")
            handle.host.copy_(packed, non_blocking=True)
            if out.topk_ids is not None:
                handle.topk = (out.topk_ids, out.topk_logprobs, [v.num_logprobs for v in rows.values])
            handle.num_rows = len(rows.seeds)
        handle.prompt = self._prompt_logprobs(hidden, prompt_rows)
        if dev.type == "cuda":
            handle.event = torch.cuda.Event()
            handle.event.record()
        return handle

    def collect(self, handle: StepHandle) -> RunnerOutput:
        """Wait for a launched step and bring its results to the host."""
        if handle.event is not None:
            handle.event.synchronize()
        token_ids: list[int] = []
        logprobs: list[float] = []
        top: list[dict[int, float] | None] = []
        if handle.host is not None:
            token_ids = handle.host[0].long().tolist()
            logprobs = handle.host[1].tolist()
            top = [None] * handle.num_rows
            if handle.topk is not None:
                top = _top_dicts(*handle.topk)
        prompt = {}
        for request_id, lp, top_ids, top_lp, k in handle.prompt:
            count = lp.shape[0]
            tops = _top_dicts(top_ids, top_lp, [k] * count) if k > 0 else [None] * count
            prompt[request_id] = (lp.tolist(), tops)
        return RunnerOutput(token_ids, logprobs, top, prompt)

    def _prompt_logprobs(
        self, hidden: torch.Tensor, prompt_rows: list[_PromptRows]
    ) -> list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor, int]]:
        # [rows, vocab] logits (and their fp32 copy) in chunks of max_num_seqs rows: the size the KV
        # cache budget was profiled with, where a whole prompt chunk (up to max_num_batched_tokens
        # rows) could take gigabytes more
        chunk = self.scheduler_config.max_num_seqs
        result = []
        for request_id, first, count, next_ids, k in prompt_rows:
            targets = to_device_async(torch.tensor(next_ids, dtype=torch.long), self.device)
            parts = [
                prompt_logprobs(
                    self.model.compute_logits(hidden[first + i : first + min(i + chunk, count)]),
                    targets[i : i + chunk],
                    k,
                )
                for i in range(0, count, chunk)
            ]
            lp, top_ids, top_lp = (
                parts[0] if len(parts) == 1 else (torch.cat(t) for t in zip(*parts, strict=True))
            )
            result.append((request_id, lp, top_ids, top_lp, k))
        return result

    def _sampling_rows(
        self, batch: ScheduledBatch, prev: StepHandle | None = None
    ) -> tuple[_SamplingRows, list[_PromptRows]]:
        """The rows that sample, as columns, and (request_id, first hidden row, count, next ids, k) of
        the prompt positions whose logprobs were asked for."""
        rows = _SamplingRows()
        prompt_rows: list[_PromptRows] = []
        values, seeds, offsets = rows.values, rows.seeds, rows.offsets
        row = 0
        for s in batch.requests:
            req = s.request
            if s.sample:
                v = req.sampling_values
                if v is None:
                    v = req.sampling_values = self._effective_values(req.params)
                values.append(v)
                rows.requests.append(req)
                seeds.append(req.seed)  # in [0, 2**63): drawn or derived by the engine
                # The RNG counter: the index of the output token sampled now. update_computed already
                # counted it as pending, together with any token still in flight before it.
                offset = req.num_output_tokens + req.num_pending - 1
                offsets.append(offset)
                if offset < req.params.min_tokens:
                    banned = self._banned_tokens(req)
                    rows.banned_rows.extend([len(seeds) - 1] * len(banned))
                    rows.banned_tokens.extend(banned)
                if v.has_penalties:  # the row needs its token history (read only if tensors are built)
                    rows.penalized.append(len(seeds) - 1)
                if v.has_bias:  # (tokens checked against the vocabulary at admission)
                    rows.bias = rows.bias or LogitBiasColumns()
                    rows.bias.add(len(seeds) - 1, req.params.logit_bias)
            k = req.params.prompt_logprobs
            if k is not None:
                start, n = s.start, s.num_new_tokens
                last_prompt_pos = req.num_prompt_tokens - 1  # logits at p predict token p + 1
                if start < last_prompt_pos:
                    count = min(start + n, last_prompt_pos) - start
                    prompt_rows.append(
                        (req.request_id, row, count, req.token_ids[start + 1 : start + 1 + count], k)
                    )
            row += s.num_new_tokens
        return rows, prompt_rows

    def _prepare(
        self,
        batch: ScheduledBatch,
        num_rows: int,
        prev: StepHandle | None = None,
        pad_rows: bool = False,
        mixed: MixedLayout | None = None,
    ) -> _HostInputs:
        """Host arrays of the step, packed in one (pinned on CUDA) int64 buffer. With num_rows >
        num_tokens the extra rows are padding: token 0 at position 0, stored nowhere (slot -1); in a
        decode-only step (a graph's padded size, or an eager one) each is also a padding sequence of
        length 0, in a mixed step no sequence owns them (the attention kernels leave them
        unwritten). With ``pad_rows`` the logits rows are padded to ``padded_rows`` entries
        (repeating row 0) and never marked as leading. With ``mixed`` (a step with prompt tokens for
        a mixed graph) the decode rows' lengths and order cover ``mixed.decode_rows`` rows and the
        extend kernel's tile list is built."""
        bs = self.block_size
        reqs = batch.requests
        num_seqs = len(reqs)
        decode_only = batch.num_tokens == num_seqs
        padded_seqs = num_seqs + (num_rows - batch.num_tokens) if decode_only else num_seqs
        block_lists = [s.request.block_ids for s in reqs]
        num_blocks = [len(blocks) for blocks in block_lists]
        max_blocks = max(num_blocks)
        samples = [s.sample for s in reqs]
        num_samples = samples.count(True)
        ph_dst: list[int] = []
        ph_src: list[int] = []
        if prev is not None:
            for i, s in enumerate(reqs):
                # a placeholder is always the last row of its request (one pending token at most)
                if s.start + s.num_new_tokens > s.request.num_tokens:
                    ph_src.append(prev.row_of(s.request))
                    ph_dst.append(-1 - i)  # fixed up below, once row offsets are known
        num_logits_rows = padded_rows(num_samples) if pad_rows and num_samples else num_samples
        host = _HostInputs.allocate(
            num_rows,
            padded_seqs,
            num_seqs,
            max_blocks,
            num_logits_rows,
            len(ph_dst),
            self.device,
            mixed,
        )
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
                chain.from_iterable(_new_token_ids(s) for s in reqs), np.int64, total
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
        if ph_dst:
            v["placeholder_dst"][:] = rows_of[[-1 - d for d in ph_dst]]
            v["placeholder_src"][:] = ph_src
        host.seq_lens_host = v["seq_lens"].tolist()
        host.query_start_host = v["query_start"].tolist()
        host.max_query_len = max_query_len
        return host

    def _to_device(
        self, host: _HostInputs, v: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
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
        )
        return v["input_ids"], v["positions"], meta

    def _sampling_tensors(self, rows: _SamplingRows, prev: StepHandle | None) -> SamplingTensors:
        """The step's sampling tensors. A steady decode batch (the same requests as the previous
        sampling step, in the same order, each one token further, nothing banned) reuses that step's
        tensors: the RNG counters advance on the device, and penalty rows count the tokens that step
        sampled (still on the device) instead of sending their whole history again. One or two small
        kernels instead of a host build and copies."""
        last = self._last_sampling
        if (
            last is not None
            and last[2] is not None
            and not rows.banned_rows
            and not last[0].banned_rows
            and rows.requests == last[0].requests  # by identity: Request has no __eq__
            and rows.offsets == [o + 1 for o in last[0].offsets]
        ):
            tensors, sampled = last[1], last[2]
            tensors.offsets.add_(1)  # ordered after the previous step's reads on the stream
            if tensors.penalties is not None:
                every_row = torch.arange(len(rows.seeds), device=sampled.device)
                tensors.penalties.add_output_tokens(every_row, sampled)
        else:
            tensors = rows.tensors(self.vocab_size, self.device, prev)
        self._last_sampling = (rows, tensors, None)
        return tensors

    def drop_step_state(self) -> None:
        """Forget what steady steps reuse (the last sampling tensors, [B, V] with penalties): before
        ``sleep`` hands the memory to a trainer."""
        self._last_sampling = None

    def _effective_values(self, params: SamplingParams) -> RowValues:
        """``effective_values`` of ``params``, one tuple per params object: requests that share
        params share the tuple, which lets ``SamplingTensors.from_columns`` broadcast it."""
        entry = self._values_cache.get(id(params))
        if entry is None or entry[0] is not params:
            if len(self._values_cache) > 4096:  # params die with their requests: forget old ones
                self._values_cache.clear()
            entry = self._values_cache[id(params)] = (params, effective_values(params, self.vocab_size))
        return entry[1]

    @staticmethod
    def _banned_tokens(req) -> list[int]:
        """EOS and stop tokens may not be sampled before min_tokens outputs exist."""
        return sorted(set(req.eos_token_ids) | set(req.params.stop_token_ids))


_PromptRows = tuple[str, int, int, list[int], int]


@dataclass(eq=False)
class _SamplingRows:
    """One step's sampling rows as columns (see ``SamplingTensors.from_columns``)."""

    values: list[RowValues] = field(default_factory=list)  # effective_values of each row's params
    seeds: list[int] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    banned_rows: list[int] = field(default_factory=list)
    banned_tokens: list[int] = field(default_factory=list)
    bias: LogitBiasColumns | None = None  # of the rows with a logit bias
    requests: list[Request] = field(default_factory=list)  # the request of each row
    penalized: list[int] = field(default_factory=list)  # rows with penalties

    def history(self, prev: StepHandle | None) -> tuple[PenaltyHistory, list[int], list[int]]:
        """The token history of the penalized rows: what the host knows, as (row, token) pairs, and
        (rows, indexes in ``prev``'s sampled tokens) of the last output tokens still on the device
        (overlapped loop). O(tokens so far): built only when the tensors are."""
        history = PenaltyHistory()
        pending_rows: list[int] = []
        pending_src: list[int] = []
        for row in self.penalized:
            req = self.requests[row]
            outputs = req.token_ids[len(req.prompt_token_ids) :]
            history.output_rows.extend([row] * len(outputs))
            history.output_tokens.extend(outputs)
            if self.values[row].repetition != 1.0:  # the prompt counts too
                history.prompt_rows.extend([row] * len(req.prompt_token_ids))
                history.prompt_tokens.extend(req.prompt_token_ids)
            if req.num_pending > 1:  # besides this step's: the previous step's token
                assert prev is not None
                pending_rows.append(row)
                pending_src.append(prev.row_of(req))
        return history, pending_rows, pending_src

    def tensors(
        self, vocab_size: int, device: torch.device, prev: StepHandle | None = None
    ) -> SamplingTensors:
        history, pending_rows, pending_src = self.history(prev) if self.penalized else (None, [], [])
        t = SamplingTensors.from_columns(
            self.values,
            self.seeds,
            self.offsets,
            self.banned_rows,
            self.banned_tokens,
            vocab_size,
            device,
            history,
            self.bias,
        )
        if pending_rows:
            assert t.penalties is not None and prev is not None and prev.token_ids is not None
            idx = to_device_async(torch.tensor([pending_rows, pending_src]), device)
            t.penalties.add_output_tokens(idx[0], prev.token_ids.index_select(0, idx[1]))
        return t


@dataclass(eq=False)
class StepHandle:
    """A step enqueued on the device whose results have not been read yet (see ``launch``)."""

    batch: ScheduledBatch
    token_ids: torch.Tensor | None = None  # [num_rows] i64 on the device: the sampled tokens
    host: torch.Tensor | None = None  # [2, num_rows] f64 host copy (ids, logprobs), filled async
    num_rows: int = 0  # rows that sampled
    topk: tuple[torch.Tensor, torch.Tensor, list[int]] | None = None  # top-k ids, logprobs, k per row
    prompt: list = field(default_factory=list)  # (request_id, logprobs, top ids, top logprobs, k)
    event: torch.cuda.Event | None = None  # recorded after the step's last kernel (CUDA)
    _rows: dict[int, int] | None = None

    def row_of(self, request) -> int:
        """Index of ``request``'s sampled token in ``token_ids``."""
        if self._rows is None:
            self._rows = {}
            i = 0
            for s in self.batch.requests:
                if s.sample:
                    self._rows[id(s.request)] = i
                    i += 1
        return self._rows[id(request)]


_FIELDS = (
    "input_ids",
    "positions",
    "slots",
    "seq_lens",
    "query_start",
    "block_tables",
    "logits_rows",
    "placeholder_dst",
    "placeholder_src",
    "decode_order",
    "decode_lens",
    "tiles",
)


@dataclass(eq=False)
class _HostInputs:
    """One step's inputs on the host, padded to ``num_rows`` tokens/sequences for graph replay,
    packed in one int64 buffer so they travel in one host-to-device copy."""

    ints: torch.Tensor  # the packed buffer (pinned on CUDA)
    layout: dict[str, tuple[int, int, tuple[int, ...]]]  # field -> (offset, size, shape)
    num_placeholders: int
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
    ) -> _HostInputs:
        order_rows = mixed.decode_rows if mixed is not None else padded_seqs
        shapes = (
            (num_rows,),  # input_ids
            (num_rows,),  # positions
            (num_rows,),  # slots
            (padded_seqs,),  # seq_lens
            (num_seqs + 1,),  # query_start
            (padded_seqs, max_blocks),  # block_tables
            (num_logits_rows,),  # logits_rows
            (num_placeholders,),  # placeholder_dst
            (num_placeholders,),  # placeholder_src
            (order_rows,),  # decode_order (its leading num_decodes entries in a mixed step)
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


def _new_token_ids(s: ScheduledRequest) -> list[int]:
    """The input ids of a scheduled request's rows: its tokens from ``start``, and 0 for a
    placeholder (a token sampled by the step still in flight; the device fills it in)."""
    tokens = s.request.token_ids[s.start : s.start + s.num_new_tokens]
    return tokens if len(tokens) == s.num_new_tokens else tokens + [0] * (s.num_new_tokens - len(tokens))


def _top_dicts(
    ids: torch.Tensor | None, logprobs: torch.Tensor | None, wanted: list[int]
) -> list[dict[int, float] | None]:
    if ids is None or logprobs is None or not any(wanted):
        return [None] * len(wanted)
    ids_l, lp_l = ids.tolist(), logprobs.tolist()
    return [dict(zip(ids_l[i][:k], lp_l[i][:k], strict=True)) if k else None for i, k in enumerate(wanted)]


def _profile_blocks(num_tokens: int, max_model_len: int, block_size: int) -> int:
    """Blocks the profile step's prompts fill (see ``_profile_step_meta``)."""
    seq_len = min(num_tokens, max_model_len)
    full, rest = divmod(num_tokens, seq_len)
    return full * -(-seq_len // block_size) + -(-rest // block_size)


def _profile_step_meta(
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
    tables.masked_fill_(tables >= _profile_blocks(num_tokens, max_model_len, block_size), 0)
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
