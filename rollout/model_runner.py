"""Runs one scheduled step on the model: builds the inputs and attention metadata, runs the forward,
computes logits only for rows that need them, and samples."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from rollout.config import CacheConfig, RunnerConfig, SchedulerConfig
from rollout.cuda_graphs import DecodeGraphs
from rollout.models.config import ModelConfig
from rollout.models.layers.attention import AttentionMetadata
from rollout.models.loader import load_model
from rollout.samplers.sampler import prompt_logprobs, sample
from rollout.samplers.tensors import RowSampling, SamplingTensors
from rollout.scheduler import ScheduledBatch


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


@dataclass
class _HostInputs:
    """One step's inputs on the host, padded to ``num_rows`` tokens/sequences for graph replay."""

    input_ids: np.ndarray  # [num_rows] int64
    positions: np.ndarray  # [num_rows] int64
    slots: np.ndarray  # [num_rows] int64, -1 on padding rows
    block_tables: np.ndarray  # [num_seqs (padded), max blocks used] int32
    seq_lens: list[int]  # [num_seqs (padded)], 0 on padding rows
    query_start: list[int]  # [num_seqs + 1] (unpadded)
    logits_rows: list[int]  # hidden rows of the sampling requests


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
        self.vocab_size = model_config.vocab_size
        self.num_blocks = self._decide_num_blocks()
        self.kv_cache = self._allocate_kv_cache(self.num_blocks)
        self._bind_kv_cache(self.kv_cache)
        self.graphs: DecodeGraphs | None = None
        if self.attention_backend == "triton" and self.runner_config.cuda_graphs and device.type == "cuda":
            max_blocks = -(-model_config.max_model_len // self.block_size)
            max_batch = min(self.runner_config.max_graph_batch, scheduler_config.max_num_seqs)
            self.graphs = DecodeGraphs(self.model, max_batch, max_blocks, model_config.max_model_len, device)
            self.graphs.capture()

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
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

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
        sc = self.scheduler_config
        num_tokens = min(sc.max_num_batched_tokens, self.model_config.max_model_len)
        scratch_blocks = -(-num_tokens // self.block_size)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        self._bind_kv_cache(self._allocate_kv_cache(scratch_blocks))
        ids = torch.zeros(num_tokens, dtype=torch.long, device=self.device)
        meta = _single_sequence_meta(num_tokens, self.block_size, self.device)
        hidden = self.model(ids, torch.arange(num_tokens, device=self.device), meta)
        rows = torch.arange(min(sc.max_num_seqs, num_tokens), device=self.device)
        self.model.compute_logits(hidden[rows])
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        self._bind_kv_cache(None)
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        outside_torch = total - free - torch.cuda.memory_reserved(self.device)
        budget = total * self.cache_config.gpu_memory_utilization - peak - outside_torch
        return int(budget // self.block_bytes())

    # ---- one step ---------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> RunnerOutput:
        rows, prompt_rows = self._sampling_rows(batch)
        graph_size = None
        if self.graphs is not None and batch.num_tokens == len(batch.requests):  # decode only
            graph_size = self.graphs.padded_size(len(batch.requests))
        host = self._prepare(batch, graph_size or batch.num_tokens)
        if graph_size is not None:
            assert self.graphs is not None
            hidden = self.graphs.replay(
                graph_size,
                torch.from_numpy(host.input_ids),
                torch.from_numpy(host.positions),
                torch.from_numpy(host.slots),
                torch.tensor(host.seq_lens, dtype=torch.int32),
                torch.from_numpy(host.block_tables),
            )
        else:
            ids, positions, meta = self._to_device(host)
            hidden = self.model(ids, positions, meta)
        token_ids: list[int] = []
        logprobs: list[float] = []
        top: list[dict[int, float] | None] = []
        if rows:
            logits_rows = torch.tensor(host.logits_rows, dtype=torch.long).to(self.device, non_blocking=True)
            logits = self.model.compute_logits(hidden[logits_rows])
            out = sample(logits, SamplingTensors.build(rows, self.vocab_size, self.device))
            # one device-to-host copy for ids and logprobs (ids < 2**24 are exact in float64)
            packed = torch.stack([out.token_ids.double(), out.logprobs.double()]).cpu()
            token_ids = packed[0].long().tolist()
            logprobs = packed[1].tolist()
            top = _top_dicts(out.topk_ids, out.topk_logprobs, [r.params.logprobs or 0 for r in rows])
        return RunnerOutput(token_ids, logprobs, top, self._prompt_logprobs(hidden, prompt_rows))

    def _prompt_logprobs(
        self, hidden: torch.Tensor, prompt_rows: list[tuple[str, int, int, list[int], int]]
    ) -> dict[str, tuple[list[float], list[dict[int, float] | None]]]:
        result = {}
        for request_id, first, count, next_ids, k in prompt_rows:
            logits = self.model.compute_logits(hidden[first : first + count])
            targets = torch.tensor(next_ids, dtype=torch.long, device=self.device)
            lp, top_ids, top_lp = prompt_logprobs(logits, targets, k)
            tops = _top_dicts(top_ids, top_lp, [k] * count) if k > 0 else [None] * count
            result[request_id] = (lp.tolist(), tops)
        return result

    def _sampling_rows(
        self, batch: ScheduledBatch
    ) -> tuple[list[RowSampling], list[tuple[str, int, int, list[int], int]]]:
        """Rows that sample, and (request_id, first hidden row, count, next ids, k) of the prompt
        positions whose logprobs were asked for."""
        rows: list[RowSampling] = []
        prompt_rows: list[tuple[str, int, int, list[int], int]] = []
        row = 0
        for s in batch.requests:
            req, start, n = s.request, s.start, s.num_new_tokens
            if s.sample:
                rows.append(
                    RowSampling(req.params, req.seed, req.num_output_tokens, self._banned_tokens(req))
                )
            k = req.params.prompt_logprobs
            last_prompt_pos = req.num_prompt_tokens - 1  # logits at p predict token p + 1
            if k is not None and start < last_prompt_pos:
                count = min(start + n, last_prompt_pos) - start
                prompt_rows.append(
                    (req.request_id, row, count, req.token_ids[start + 1 : start + 1 + count], k)
                )
            row += n
        return rows, prompt_rows

    def _prepare(self, batch: ScheduledBatch, num_rows: int) -> _HostInputs:
        """Host arrays of the step. With num_rows > num_tokens (a decode graph's padded size), the
        extra rows are padding sequences of length 0 whose token is stored nowhere."""
        bs = self.block_size
        num_seqs = len(batch.requests)
        padded_seqs = num_seqs + (num_rows - batch.num_tokens)
        input_ids = np.zeros(num_rows, dtype=np.int64)
        positions = np.zeros(num_rows, dtype=np.int64)
        slots = np.full(num_rows, -1, dtype=np.int64)
        max_blocks = max(len(s.request.block_ids) for s in batch.requests)
        block_tables = np.zeros((padded_seqs, max_blocks), dtype=np.int32)
        seq_lens = [0] * padded_seqs
        query_start = [0] * (num_seqs + 1)
        logits_rows: list[int] = []
        row = 0
        for i, s in enumerate(batch.requests):
            req, start, n = s.request, s.start, s.num_new_tokens
            end = start + n
            blocks = req.block_ids
            block_tables[i, : len(blocks)] = blocks
            if n == 1:
                input_ids[row] = req.token_ids[start]
                positions[row] = start
                slots[row] = blocks[start // bs] * bs + start % bs
            else:
                pos = np.arange(start, end)
                input_ids[row : row + n] = req.token_ids[start:end]
                positions[row : row + n] = pos
                slots[row : row + n] = np.asarray(blocks)[pos // bs] * bs + pos % bs
            seq_lens[i] = end
            query_start[i + 1] = row + n
            if s.sample:
                logits_rows.append(row + n - 1)
            row += n
        return _HostInputs(input_ids, positions, slots, block_tables, seq_lens, query_start, logits_rows)

    def _to_device(self, host: _HostInputs) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        dev = self.device
        num_seqs = len(host.query_start) - 1
        meta = AttentionMetadata(
            slot_mapping=torch.from_numpy(host.slots).to(dev, non_blocking=True),
            block_tables=torch.from_numpy(host.block_tables).to(dev, non_blocking=True),
            seq_lens=torch.tensor(host.seq_lens, dtype=torch.int32).to(dev, non_blocking=True),
            query_start_loc=torch.tensor(host.query_start, dtype=torch.int32).to(dev, non_blocking=True),
            seq_lens_host=host.seq_lens,
            query_start_loc_host=host.query_start,
            max_seq_len=max(host.seq_lens),
            max_query_len=max(host.query_start[i + 1] - host.query_start[i] for i in range(num_seqs)),
        )
        ids = torch.from_numpy(host.input_ids).to(dev, non_blocking=True)
        positions = torch.from_numpy(host.positions).to(dev, non_blocking=True)
        return ids, positions, meta

    @staticmethod
    def _banned_tokens(req) -> list[int]:
        """EOS and stop tokens may not be sampled before min_tokens outputs exist."""
        if req.num_output_tokens >= req.params.min_tokens:
            return []
        return sorted(set(req.eos_token_ids) | set(req.params.stop_token_ids))


def _top_dicts(
    ids: torch.Tensor | None, logprobs: torch.Tensor | None, wanted: list[int]
) -> list[dict[int, float] | None]:
    if ids is None or logprobs is None or not any(wanted):
        return [None] * len(wanted)
    ids_l, lp_l = ids.tolist(), logprobs.tolist()
    return [dict(zip(ids_l[i][:k], lp_l[i][:k], strict=True)) if k else None for i, k in enumerate(wanted)]


def _single_sequence_meta(num_tokens: int, block_size: int, device: torch.device) -> AttentionMetadata:
    """Metadata for one sequence of ``num_tokens`` fresh tokens in blocks 0..n-1 (profiling)."""
    num_blocks = -(-num_tokens // block_size)
    return AttentionMetadata(
        slot_mapping=torch.arange(num_tokens, device=device),
        block_tables=torch.arange(num_blocks, dtype=torch.int32, device=device)[None],
        seq_lens=torch.tensor([num_tokens], dtype=torch.int32, device=device),
        query_start_loc=torch.tensor([0, num_tokens], dtype=torch.int32, device=device),
        seq_lens_host=[num_tokens],
        query_start_loc_host=[0, num_tokens],
        max_seq_len=num_tokens,
        max_query_len=num_tokens,
    )
