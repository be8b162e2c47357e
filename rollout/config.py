"""Frozen configuration of the engine's components (environment variables are for debugging only)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache sizing."""

    block_size: int = 16  # tokens per KV block
    enable_prefix_caching: bool = True  # share full blocks across requests by chained content hash
    gpu_memory_utilization: float = (
        0.9  # fraction of GPU memory the engine may hold (weights + KV + activations)
    )
    cpu_kv_cache_bytes: int = 1 << 30  # KV budget when running on the CPU
    num_blocks: int | None = None  # fixed block count (tests, benchmarks); overrides both budgets

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.cpu_kv_cache_bytes < 1:
            raise ValueError(f"cpu_kv_cache_bytes must be positive, got {self.cpu_kv_cache_bytes}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits for one engine step."""

    max_num_batched_tokens: int = 8192  # token budget of one step (prefill chunks + decodes)
    max_num_seqs: int = 256  # sequences running at once
    enable_chunked_prefill: bool = True  # split long prompts across steps instead of waiting for room
    # Overlapped loop: schedule and prepare step N+1 (its decodes take the tokens of step N from the
    # device) while step N runs, then read N's results. None = on for CUDA, off elsewhere. Outputs
    # are the same either way; a request may finish one step later in wall time, never in tokens.
    overlap: bool | None = None

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")


@dataclass(frozen=True)
class RunnerConfig:
    """How the model runs on its device."""

    attention_backend: str = "auto"  # "triton" (CUDA), "torch" (CPU path), or "auto": triton on CUDA
    cuda_graphs: bool = True  # replay captured graphs for decode steps (triton backend on CUDA only)
    max_graph_batch: int = 256  # largest decode batch served by a graph; larger ones run eagerly
    # Steps with prompt tokens (prompt chunks, mixed batches) of up to this many (padded) tokens
    # replay one CUDA graph of the whole forward, attention included (see rollout/mixed_graphs.py);
    # 0: off. On the H200, W2 (`rollout bench rl`) makespan 22.08 / 22.11 s with them against
    # 22.59 / 23.28 s without (stop 20; 22.45 / 22.41 against 23.81 / 23.24 in stop 19), its
    # mixed steps 6.8 ms against 11-14 ms; W1 25,620 / 25,501 against 25,434 / 25,488 tok/s; the
    # steady decode step the same. Captured at start-up and at every wake_up.
    max_mixed_graph_tokens: int = 8192
    # Steps with prompt tokens that no mixed graph serves (max_mixed_graph_tokens below this)
    # replay graphs of everything but the attention, which runs eagerly between them (see
    # rollout/piecewise_graphs.py); 0: off. The fallback when mixed graphs are off: on the H200
    # they cut W2's makespan 27.5-28.2 -> 24.2 s against fully eager steps. Either kind's pools
    # take ~0.5 GiB from the KV cache (W1 on the H200: 68,369 blocks either way); a colocated
    # trainer with short rollouts may prefer both at 0 (faster wake_up).
    max_piecewise_tokens: int = 8192
    # Split decode attention merges its splits in the kernel, one launch fewer per layer at small
    # batches (see rollout/kernels/decode_attention.py). Off: on the H200 the batch-1 step gained
    # 3% and W1 did not (its admission steps were slower; attention_notes.md).
    fused_decode_merge: bool = False
    fused_ops: bool = True  # Triton kernels for add+RMSNorm, q/k norm+RoPE, SiLU-and-mul (triton backend)
    # Steps of at most this many rows (<= 16) run each layer's projections as fused small-batch
    # GEMVs, the RMSNorms and SiLU-and-mul folded in (rollout/kernels/gemv.py; triton backend);
    # 0: off. H200, Qwen3-0.6B steady decode step (`rollout bench step_profile`, ctx 1K): batch 1
    # 1.35 ms with them against 1.55-1.56 without (1.26 with small_batch_gemv_pdl). With whole-K
    # tiles that keep their columns at every row count (stop 28): batch 2 / 3 / 4 1.164 / 1.380 /
    # 1.423 ms against 1.649 / 1.609 / 1.650 on cuBLAS (batch 1 0.902 / 0.910). From 5 rows the
    # GEMVs take 16-row tensor-core tiles and cuBLAS wins (batch 8 2.05 against 1.61 ms), hence 4.
    small_batch_gemv_rows: int = 4
    # Such steps launch as a chain of programmatic dependents (Hopper+; elsewhere plain launches):
    # the GEMVs, the q/k norm + RoPE + store kernel, the decode attention (split and merge) and
    # the final norm. Each may start while the launch before it finishes, loads what does not
    # depend on it (a GEMV's first weight tile), waits for it, then lets the next launch start.
    # Batch 1 (above): 1.21 ms against 1.28 with the GEMVs alone as dependents and 1.35-1.37 with
    # none (H200, stop 22). The LM head of such steps runs as a GEMV either way (same time as
    # cuBLAS's, 1.536 / 1.544 ms).
    small_batch_gemv_pdl: bool = True
    # How those GEMVs read their weights (``kernels.gemv.GemvTiling``): ``whole_k``, each program
    # loads all of K (up to 4,096 at one row) as one tile before it waits for its input (the
    # weights of every resident program in flight at once, where the default loop keeps one 16 KB
    # tile in flight per program); ``stages`` > 0, the loop is software-pipelined that deep. H200,
    # stop 27 (`rollout bench step_profile --batches 1 [--no-gemv-whole-k]`, two runs each): batch-1
    # step 0.900 / 0.900 ms with whole_k against 1.189 / 1.188 without; stages 3: 1.227 (off).
    small_batch_gemv_whole_k: bool = True
    small_batch_gemv_stages: int = 0
    # Such steps, when decode-only, do the q/k norm + RoPE and the K/V store inside the decode
    # attention launch (``decode_attention_qkv``): one launch fewer per layer. Batch 1 (above):
    # 1.186 / 1.190 ms against 1.200 / 1.205 (H200, stop 23). Not for larger steps: every split
    # program repeats the norm + RoPE ahead of its first K/V tile, and at batch 32 / 256 that cost
    # more than the launch it saves (2.58 / 9.47 ms against 2.41 / 9.40; W1 -2%).
    small_batch_decode_rope: bool = True
    # Such steps' attention programs also load their first K/V tile before waiting for the qkv
    # projection (``decode_attention_qkv(preload=True)``; 64-position tiles then: held across the
    # wait, 128-position ones took 252 registers on sm_90 against 128), so that HBM latency
    # overlaps the GEMV's tail. H100 batch-1 profile (stop 31): the split kernel 7.5 us per layer
    # for ~1.4 us of K/V bytes. Built without a GPU; off until measured (`rollout bench
    # step_profile --decode-preload`; the outputs are bitwise the same, tests/kernels/
    # test_decode_attention.py).
    small_batch_decode_preload: bool = False
    # Decode-only steps of any size (past small_batch_gemv_rows too) launch the q/k norm + RoPE +
    # store kernel and the decode attention (split and merge) as programmatic dependents (Hopper+;
    # elsewhere plain launches): the attention's programs start while the q/k kernel finishes and
    # the merge's while the splits finish. The GEMMs around them (cuBLAS) stay plain launches.
    # Off until measured: built in stop 26 when no GPU was lent (`rollout bench step_profile
    # --decode-pdl` against `--no-decode-pdl`; tests/rollout/test_decode_pdl_gpu.py checks that
    # the outputs are the same).
    decode_attention_pdl: bool = False
    # Decode graph steps whose rows the fused sampling kernel serves alone (no top-k / top-p /
    # min-p, penalties, biases or bans; no top logprobs from processed logits) sample in a CUDA
    # graph of their own, per graph size (rollout/sampler_graphs.py): one graph launch instead of
    # ``sample``'s allocations, two Triton launches and the result packing, ~0.3-0.45 ms of host
    # time per step on the H100's host (stop 29: its 1-4-row steps are host-bound, `launch` alone
    # 0.87-1.27 ms). Measured with graph_inputs (below); tests/rollout/test_sampler_graphs_gpu.py
    # checks the outputs. Without CUDA (triton backend) the two options run the decode and sampler
    # graphs' code uncaptured, over the same static buffers: the CPU tests' path.
    graph_sampling: bool = True
    # Decode graph steps take their inputs in one copy into a staging buffer, and the graph's first
    # kernel unpacks them (rollout/kernels/graph_inputs.py): the tokens sampled by the step in
    # flight are read from a buffer every sampling step writes, the lengths, decode order and
    # block tables converted to int32 there. One copy instead of the six copies and the token fill
    # (two more launches) launched from the host before each replay, ~0.25 ms of the H100's
    # host time per batch-1 step (stop 29's profile). H200 with graph_sampling (stop 30, `bash
    # rollout/benchmarks/gpu_suite.sh compare "--graph-sampling --graph-inputs"`): steps of 1-16
    # rows 1.4-2.0% faster, host `launch` 0.26-0.43 ms against 0.56-0.83; W1 unchanged. H100 (stop
    # 31, both on against both off): 1-4 rows 2.2-3.0% faster (batch 1 0.974 against 1.003 ms),
    # `launch` 0.29-0.52 ms against 0.80-1.35, 8-16 rows ~1%; W1 unchanged.
    graph_inputs: bool = True
    # CUDA: the weights and the KV cache live in address ranges that sleep keeps reserved while
    # it gives their physical memory back (rollout/vmm.py), so wake_up maps new memory at the
    # same addresses and the CUDA graphs stay valid instead of being captured again. The graphs'
    # own pools stay allocated through a sleep. H200, Qwen3-0.6B (`rollout bench weight_sync`):
    # wake_up 34 / 21 ms after sleep(1) / sleep(2) against 5.3 / 4.0 s with it off (graphs
    # captured again), 4.95 GB freed against 6.15 GB. False: the most memory back, slow wake.
    sleep_keeps_graphs: bool = True

    def __post_init__(self) -> None:
        if self.attention_backend not in ("auto", "triton", "torch"):
            raise ValueError(
                f"attention_backend must be auto, triton or torch, got {self.attention_backend!r}"
            )
        if self.max_graph_batch < 1:
            raise ValueError(f"max_graph_batch must be >= 1, got {self.max_graph_batch}")
        if self.max_piecewise_tokens < 0:
            raise ValueError(f"max_piecewise_tokens must be >= 0, got {self.max_piecewise_tokens}")
        if not 0 <= self.small_batch_gemv_rows <= 16:
            raise ValueError(f"small_batch_gemv_rows must be in [0, 16], got {self.small_batch_gemv_rows}")
        if not 0 <= self.small_batch_gemv_stages <= 8:
            raise ValueError(f"small_batch_gemv_stages must be in [0, 8], got {self.small_batch_gemv_stages}")
        if self.max_mixed_graph_tokens < 0:
            raise ValueError(f"max_mixed_graph_tokens must be >= 0, got {self.max_mixed_graph_tokens}")
