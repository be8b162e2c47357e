"""Runs one scheduled step on the model: builds the inputs and attention metadata, runs the forward,
computes logits only for rows that need them, and samples."""

from __future__ import annotations

import gc
import math
from dataclasses import dataclass, field

import torch

from rollout.config import CacheConfig, RunnerConfig, SchedulerConfig
from rollout.cuda_graphs import DecodeGraphs, eager_token_sizes, padded_tokens
from rollout.mixed_graphs import MixedGraphs, MixedLayout
from rollout.models.config import ModelConfig
from rollout.models.layers.attention import AttentionMetadata
from rollout.models.loader import load_model
from rollout.piecewise_graphs import PiecewiseGraphs
from rollout.sampler_graphs import SamplerGraphs
from rollout.samplers.params import MAX_LOGPROBS, SamplingParams
from rollout.samplers.sampler import SamplerOutput, prompt_logprobs, sample
from rollout.samplers.tensors import (
    PenaltyHistory,
    SamplingTensors,
    effective_values,
    to_device_async,
)
from rollout.sampling_rows import PromptRows, SamplingRows, ValuesCache, sampling_rows, top_dicts
from rollout.scheduler import ScheduledBatch
from rollout.step_inputs import HostInputs, device_metadata, prepare_inputs, profile_blocks, profile_step_meta
from rollout.vmm import VirtualMemory, pack_parameters, parameter_layout


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


# see ModelRunner._last_sampling
_LastSampling = tuple[SamplingRows, SamplingTensors, torch.Tensor | None, int | None]


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
        # With RunnerConfig.sleep_keeps_graphs on CUDA: the weights packed in one address range
        # (``weight_bytes`` of it used) and the KV cache in another, both kept across sleep.
        self.weight_memory: VirtualMemory | None = None
        self.weight_bytes = 0
        self.kv_memory: VirtualMemory | None = None
        if self.runner_config.sleep_keeps_graphs and device.type == "cuda":
            params = dict(self.model.named_parameters())  # tied parameters appear once
            offsets, self.weight_bytes = parameter_layout(params)
            for p in params.values():  # through the host: never two copies on the device
                p.data = p.data.cpu()
            torch.cuda.empty_cache()
            self.weight_memory = VirtualMemory(self.weight_bytes, device)
            pack_parameters(params, offsets, self.weight_memory.tensor())
        backend = self.runner_config.attention_backend
        if backend == "auto":
            backend = "triton" if device.type == "cuda" else "torch"
        for layer in self.model.attention_layers():
            layer.backend = backend
        # Eager steps of the triton backend run the forward on a padded token count (padding rows:
        # slot -1, no sequence), at most the profiled step's; the torch attention path has none.
        self._eager_token_cap = scheduler_config.max_num_batched_tokens if backend == "triton" else None
        if backend == "triton":  # the Triton-only layer options
            from rollout.kernels.gemv import GemvTiling

            rc = self.runner_config
            for module in self.model.modules():
                if rc.fused_ops and hasattr(module, "fused"):
                    module.fused = True
                if hasattr(module, "gemv_rows"):
                    module.gemv_rows, module.gemv_pdl = rc.small_batch_gemv_rows, rc.small_batch_gemv_pdl
                if hasattr(module, "gemv_tiling"):
                    module.gemv_tiling = GemvTiling(rc.small_batch_gemv_whole_k, rc.small_batch_gemv_stages)
                if hasattr(module, "decode_rope"):
                    module.decode_rope = rc.small_batch_decode_rope
                    module.decode_preload = rc.small_batch_decode_preload
                    module.decode_pdl = rc.decode_attention_pdl
        self.split_counters: torch.Tensor | None = None  # see AttentionMetadata.split_counters
        if backend == "triton" and self.runner_config.fused_decode_merge:
            rows = max(scheduler_config.max_num_batched_tokens, scheduler_config.max_num_seqs)
            size = rows * model_config.num_kv_heads  # any launch's decode rows x KV heads
            self.split_counters = torch.zeros(size, dtype=torch.int32, device=device)
        self.vocab_size = model_config.vocab_size
        self._values = ValuesCache(self.vocab_size)  # each params object's effective values
        # the last sampling step's rows, tensors, sampled tokens and the sampler graph size whose
        # buffer holds the tensors (None: their own buffer; see _sampling_tensors)
        self._last_sampling: _LastSampling | None = None
        # with RunnerConfig.graph_inputs: the step whose sampled tokens DecodeGraphs.last_tokens holds
        self._tokens_of: StepHandle | None = None
        self.profiled_step_bytes: int | None = None  # set by the GPU memory profile (bytes)
        self.num_blocks = self._decide_num_blocks()
        self.kv_cache = self._allocate_kv_cache(self.num_blocks, keep_address=self.weight_memory is not None)
        self._bind_kv_cache(self.kv_cache)
        self.graphs: DecodeGraphs | None = None
        self.sampler_graphs: SamplerGraphs | None = None
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
        """Capture the decode graphs (and their sampler graphs with ``graph_sampling``) and the eager
        steps' mixed and piecewise graphs (when enabled) over the current weights and KV cache
        storage. Mixed graphs are built on any device with the triton backend, decode and sampler
        graphs on CUDA or with ``graph_sampling`` or ``graph_inputs`` (without CUDA they run
        uncaptured: the CPU tests' path)."""
        self.release_graphs()
        rc = self.runner_config
        if self.attention_backend != "triton" or not rc.cuda_graphs:
            return
        max_len = self.model_config.max_model_len
        max_blocks = -(-max_len // self.block_size)
        assert self._eager_token_cap is not None
        sizes = eager_token_sizes(self._eager_token_cap)
        if self.device.type == "cuda" or rc.graph_sampling or rc.graph_inputs:  # else uncaptured
            # Decode graphs first (the order made no measured difference on the H200).
            max_seqs = self.scheduler_config.max_num_seqs
            max_batch = min(rc.max_graph_batch, max_seqs)
            staged_rows = max_seqs if rc.graph_inputs else 0  # a step samples one row per sequence at most
            self.graphs = DecodeGraphs(
                self.model, max_batch, max_blocks, max_len, self.device, self.split_counters, staged_rows
            )
            self.graphs.capture()
            if rc.graph_sampling:
                logits = {size: self.graphs.outputs[size][1] for size in self.graphs.sizes}
                tokens_to = self.graphs.last_tokens if self.graphs.staged else None
                self.sampler_graphs = SamplerGraphs(logits, self.vocab_size, self.device, tokens_to)
                self.sampler_graphs.capture()
        mixed_sizes = [s for s in sizes if 2 <= s <= rc.max_mixed_graph_tokens]
        if mixed_sizes:
            max_seqs = self.scheduler_config.max_num_seqs
            self.mixed = MixedGraphs(
                self.model, mixed_sizes, max_seqs, max_blocks, max_len, self.device, self.split_counters
            )
            self.mixed.capture()
        if self.device.type != "cuda":
            return
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
        self.sampler_graphs = None
        self.pieces = None
        self.mixed = None
        self._last_sampling = None  # its tensors may live in a sampler graph's buffer
        self._tokens_of = None

    @property
    def attention_backend(self) -> str:
        return self.model.attention_layers()[0].backend

    # ---- KV cache ---------------------------------------------------------------------------
    def block_bytes(self) -> int:
        mc = self.model_config
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * mc.num_layers * self.block_size * mc.num_kv_heads * mc.head_dim * itemsize

    def _allocate_kv_cache(self, num_blocks: int, keep_address: bool = False) -> torch.Tensor:
        """A zeroed KV cache; ``keep_address`` (CUDA): in ``self.kv_memory``, whose address range
        outlives a sleep (see ``rollout.vmm``)."""
        mc = self.model_config
        shape = (mc.num_layers, 2, num_blocks, self.block_size, mc.num_kv_heads, mc.head_dim)
        if self.device.type != "cuda":
            return torch.zeros(shape, dtype=self.dtype, device=self.device)
        numel = math.prod(shape)
        if keep_address:
            self.kv_memory = VirtualMemory(numel * self.dtype.itemsize, self.device)
            return self.kv_memory.tensor().view(self.dtype)[:numel].view(shape).zero_()
        # A segment of its own, so that sleep gives all of it back: with the cache emptied first
        # the allocator cannot carve the KV cache out of a cached segment that other tensors then
        # share, and sized to a whole number of the allocator's 2 MiB pages it leaves no remainder
        # that a later tensor could take (either would pin the segment after the cache is freed).
        torch.cuda.empty_cache()
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
        scratch_blocks = profile_blocks(num_tokens, self.model_config.max_model_len, self.block_size)
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
        meta, positions = profile_step_meta(
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
        rows, prompt_rows = self._sampling_rows(batch)
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
        staged = graph_size is not None and self.graphs is not None and self.graphs.staged
        host = self._prepare(batch, num_rows, prev, pad_rows, mixed, staged)
        if staged:
            hidden, graph_logits, v = self._replay_staged(graph_size, host, prev)
        else:
            hidden, graph_logits, v = self._forward_copied(host, prev, graph_size, mixed, num_rows)
        handle = StepHandle(batch=batch)
        if rows.seeds:
            n, lead = host.num_samples, host.samples_lead  # lead: rows 0..n-1 sample (a view)
            if (
                graph_size is not None
                and self.sampler_graphs is not None
                and lead
                and rows.fused_only(self.vocab_size)
            ):  # the sampler's own graph over the decode graph's logits
                t = self._sampling_tensors(rows, prev, graph_size)
                k = min(t.max_num_logprobs, self.vocab_size)
                out, packed = self.sampler_graphs.replay(graph_size, n, k)  # (and last_tokens)
            else:
                if graph_logits is not None:  # the graph ran the LM head on its padded batch
                    logits = graph_logits[:n] if lead else graph_logits.index_select(0, v["logits_rows"])
                else:
                    rows_hidden = hidden[:n] if lead else hidden.index_select(0, v["logits_rows"])
                    logits = self.model.compute_logits(rows_hidden)[:n]
                out = sample(logits, self._sampling_tensors(rows, prev))
                del logits  # not held while prompt logprobs take their own [rows, vocab] logits
                # one device-to-host copy for ids and logprobs (ids < 2**24 are exact in float64)
                packed = torch.stack([out.token_ids.double(), out.logprobs.double()])
                if self.graphs is not None and self.graphs.staged:  # the next graph step's inputs
                    self.graphs.last_tokens[:n].copy_(out.token_ids)
            self._tokens_of = handle
            assert self._last_sampling is not None
            self._last_sampling = (*self._last_sampling[:2], out.token_ids, self._last_sampling[3])
            handle.token_ids = out.token_ids
            host_packed = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=dev.type == "cuda")
            host_packed.copy_(packed, non_blocking=True)
            handle.host = host_packed[:, :n]  # a sampler graph packs its padding rows too
            if out.topk_ids is not None:
                handle.topk = (out.topk_ids, out.topk_logprobs, [v.num_logprobs for v in rows.values])
            handle.num_rows = len(rows.seeds)
        handle.prompt = self._prompt_logprobs(hidden, prompt_rows)
        if dev.type == "cuda":
            handle.event = torch.cuda.Event()
            handle.event.record()
        return handle

    def _replay_staged(
        self, size: int | None, host: HostInputs, prev: StepHandle | None
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """A decode graph step with RunnerConfig.graph_inputs: its inputs in one copy, unpacked in
        the graph, in-flight tokens read from ``last_tokens``. Returns the graph's hidden states and
        logits, and the step's device views (only when a row does not sample: its logits rows)."""
        assert self.graphs is not None and size is not None
        if host.num_placeholders and self._tokens_of is not prev:  # graphs captured again, or state dropped
            assert prev is not None and prev.token_ids is not None
            self.graphs.last_tokens[: prev.token_ids.shape[0]].copy_(prev.token_ids)
        width = host.layout["block_tables"][2][1]
        hidden, logits = self.graphs.replay_staged(size, host.ints, width)
        v = {} if host.samples_lead else host.views(self.graphs.staged_view(host.ints.shape[0]))
        return hidden, logits, v

    def _forward_copied(
        self,
        host: HostInputs,
        prev: StepHandle | None,
        graph_size: int | None,
        mixed: MixedLayout | None,
        num_rows: int,
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
        """Any other step: its inputs in one copy, then a decode graph's or a mixed graph's static
        buffers filled from it, or an eager (or piecewise) forward over it; in-flight tokens taken
        from ``prev``'s. Returns the hidden states, the decode graph's logits (or None) and the
        step's device views."""
        v = host.views(host.ints.to(self.device, non_blocking=True))
        fill = None
        if host.num_placeholders:
            assert prev is not None and prev.token_ids is not None
            fill = (v["placeholder_dst"], prev.token_ids.index_select(0, v["placeholder_src"]))
        if graph_size is not None:
            assert self.graphs is not None
            hidden, logits = self.graphs.replay(
                graph_size,
                v["input_ids"],
                v["positions"],
                v["slots"],
                v["seq_lens"],
                v["block_tables"],
                v["decode_order"],
                fill=fill,
            )
            return hidden, logits, v
        if mixed is not None:
            assert self.mixed is not None
            return self.mixed.forward(num_rows, v, fill), None, v
        ids, positions, meta = self._to_device(host, v)
        if fill is not None:
            ids.index_copy_(0, fill[0], fill[1])
        if self.pieces is not None and num_rows in self.pieces.graphs:
            return self.pieces.forward(ids, positions, meta), None, v
        return self.model(ids, positions, meta), None, v

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
                top = top_dicts(*handle.topk)
        prompt = {}
        for request_id, lp, top_ids, top_lp, k in handle.prompt:
            count = lp.shape[0]
            tops = top_dicts(top_ids, top_lp, [k] * count) if k > 0 else [None] * count
            prompt[request_id] = (lp.tolist(), tops)
        return RunnerOutput(token_ids, logprobs, top, prompt)

    def _prompt_logprobs(
        self, hidden: torch.Tensor, prompt_rows: list[PromptRows]
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

    def _sampling_rows(self, batch: ScheduledBatch) -> tuple[SamplingRows, list[PromptRows]]:
        return sampling_rows(batch, self._values)

    def _prepare(
        self,
        batch: ScheduledBatch,
        num_rows: int,
        prev: StepHandle | None = None,
        pad_rows: bool = False,
        mixed: MixedLayout | None = None,
        graph_layout: bool = False,
    ) -> HostInputs:
        """The step's host inputs (``step_inputs.prepare_inputs``)."""
        row_of = prev.row_of if prev is not None else None
        return prepare_inputs(
            batch, num_rows, self.block_size, self.device, row_of, pad_rows, mixed, graph_layout
        )

    def _to_device(
        self, host: HostInputs, v: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        return device_metadata(host, v, self.split_counters)

    def _sampling_tensors(
        self, rows: SamplingRows, prev: StepHandle | None, graph_size: int | None = None
    ) -> SamplingTensors:
        """The step's sampling tensors, built in the buffer of the sampler graph of ``graph_size``
        when given. A steady decode batch (the same requests as the previous sampling step, in the
        same order, each one token further, nothing banned, the same buffer) reuses that step's
        tensors: the RNG counters advance on the device, and penalty rows count the tokens that step
        sampled (still on the device) instead of sending their whole history again. One or two small
        kernels instead of a host build and copies."""
        last = self._last_sampling
        if (
            last is not None
            and last[2] is not None
            and last[3] == graph_size
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
        elif graph_size is None:
            tensors = rows.tensors(self.vocab_size, self.device, prev)
        else:
            assert self.sampler_graphs is not None
            out = self.sampler_graphs.buffer(graph_size)
            tensors = rows.tensors(self.vocab_size, self.device, prev, min_rows=graph_size, out=out)
        self._last_sampling = (rows, tensors, None, graph_size)
        return tensors

    def drop_step_state(self) -> None:
        """Forget what steady steps reuse (the last sampling tensors, [B, V] with penalties): before
        ``sleep`` hands the memory to a trainer."""
        self._last_sampling = None
        self._tokens_of = None


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
