"""The Llama-shaped decoder every supported family shares; a family declares its differences as a
``DecoderSpec`` (biases, q/k norm, sliding windows) and subclasses ``DecoderForCausalLM``.

Module names mirror HF's (``model.layers.N.self_attn.qkv_proj``, ``model.norm``, ``lm_head``) so
checkpoint names map onto parameters with only the q/k/v and gate/up packing in between.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from rollout.models.layers.activation import SiluAndMul
from rollout.models.layers.attention import Attention, AttentionMetadata
from rollout.models.layers.embedding import LMHead, VocabEmbedding
from rollout.models.layers.linear import MergedLinear, QKVLinear, ReplicatedLinear
from rollout.models.layers.norm import RMSNorm
from rollout.models.layers.rotary import RopeParameters, RotaryEmbedding, apply_rotary
from rollout.models.weights import check_weights, load_weights

if TYPE_CHECKING:
    from rollout.kernels.gemv import GemvTiling


@dataclass(frozen=True)
class DecoderSpec:
    """Everything the shared decoder needs to know about one checkpoint."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int  # rows of the rotary table
    rope: RopeParameters
    tie_word_embeddings: bool
    sliding_windows: tuple[int | None, ...]  # per layer: attention window in tokens, None = full
    qkv_bias: bool = False  # bias on q/k/v projections (Qwen2; Llama/Qwen3 with attention_bias)
    o_bias: bool = False  # bias on the output projection (Llama/Qwen3 with attention_bias)
    mlp_bias: bool = False  # bias on gate/up/down (Llama with mlp_bias)
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3)

    @classmethod
    def from_hf(
        cls, config: Any, *, sliding_windows: Iterable[int | None] | None = None, **family: bool
    ) -> DecoderSpec:
        """Read the fields every family shares from an HF config; ``family`` sets the bias/norm
        switches and ``sliding_windows`` defaults to full attention in every layer."""
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act={act!r} is not supported (only 'silu')")
        num_heads = config.num_attention_heads
        windows = (
            tuple(sliding_windows) if sliding_windows is not None else (None,) * config.num_hidden_layers
        )
        if len(windows) != config.num_hidden_layers:
            raise ValueError(f"{len(windows)} sliding windows for {config.num_hidden_layers} layers")
        return cls(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // num_heads,
            rms_norm_eps=config.rms_norm_eps,
            max_position_embeddings=config.max_position_embeddings,
            rope=RopeParameters.from_hf(config),
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            sliding_windows=windows,
            **family,
        )


def windows_from_layer_types(config: Any) -> tuple[int | None, ...]:
    """Qwen-style per-layer windows: ``config.sliding_window`` on layers whose ``layer_types`` entry
    is ``"sliding_attention"`` (transformers derives it from use_sliding_window/max_window_layers)."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    return tuple(window if kind == "sliding_attention" else None for kind in layer_types)


class DecoderAttention(nn.Module):
    def __init__(self, spec: DecoderSpec, sliding_window: int | None) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.qkv_proj = QKVLinear(
            spec.hidden_size, spec.head_dim, spec.num_heads, spec.num_kv_heads, spec.qkv_bias
        )
        self.o_proj = ReplicatedLinear(spec.num_heads * spec.head_dim, spec.hidden_size, spec.o_bias)
        self.qk_norm = spec.qk_norm
        if spec.qk_norm:
            self.q_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps)
            self.k_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps)
        self.attn = Attention(
            spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.head_dim**-0.5, sliding_window
        )
        self.eps = spec.rms_norm_eps
        self.fused = False  # q/k norm + RoPE in one Triton kernel (the model runner turns it on for CUDA)
        # With ``fused`` and the triton backend: steps of at most ``gemv_rows`` tokens launch the
        # q/k norm + RoPE + store kernel, and a decode step's attention, as programmatic dependents
        # when ``gemv_pdl`` (the chain of DecoderLayer's small-batch GEMVs; set with theirs).
        self.gemv_rows = 0
        self.gemv_pdl = False
        # With ``fused`` and the triton backend: decode steps of at most ``gemv_rows`` rows run the
        # q/k norm + RoPE + K/V store in their attention launch (``decode_attention_qkv``;
        # RunnerConfig.small_batch_decode_rope), loading their first K/V tile before they wait for
        # the qkv projection with ``decode_preload`` (RunnerConfig.small_batch_decode_preload).
        self.decode_rope = False
        self.decode_preload = False
        # With ``fused`` and the triton backend: every decode-only step launches the q/k norm +
        # RoPE + store kernel and the attention as programmatic dependents (RunnerConfig.
        # decode_attention_pdl), whatever its size.
        self.decode_pdl = False

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata
    ) -> torch.Tensor:
        return self.o_proj(self.attend_qkv(self.qkv_proj(x), rope, meta))

    def attend_qkv(
        self, qkv: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata
    ) -> torch.Tensor:
        """Packed q/k/v projections [T, (Hq + 2 Hkv) * D] -> attention output [T, Hq * D] (before
        o_proj): q/k norm, RoPE, the KV store and attention. ``rope``: (cos, sin) rows of this
        step's positions, or with ``fused`` (positions, the model's cos/sin table)."""
        num_tokens = qkv.shape[0]
        if self.fused:
            from rollout.kernels.fused_ops import qk_norm_rope, qk_norm_rope_store

            positions, table = rope
            qw, kw = (self.q_norm.weight, self.k_norm.weight) if self.qk_norm else (None, None)
            attn = self.attn
            if attn.backend == "triton":  # K/V stored by the same kernel: no store_kv launch
                assert attn.k_cache is not None and attn.v_cache is not None, "KV cache not bound"
                small = 0 < num_tokens <= self.gemv_rows
                decode_only = meta.max_query_len == 1 and meta.extend_tiles is None
                pdl = (self.gemv_pdl and small) or (self.decode_pdl and decode_only)
                if small and self.decode_rope and decode_only:
                    out = attn.decode_qkv(
                        qkv, positions, table, qw, kw, self.eps, meta, pdl=pdl, preload=self.decode_preload
                    )
                    return out.view(num_tokens, -1)
                q = qk_norm_rope_store(
                    qkv,
                    positions,
                    table,
                    self.num_heads,
                    self.num_kv_heads,
                    self.head_dim,
                    attn.k_cache,
                    attn.v_cache,
                    meta.slot_mapping,
                    qw,
                    kw,
                    self.eps,
                    pdl=pdl,
                )
                return attn.attend(q.view(num_tokens, -1), meta, pdl=pdl)
            q, k = qk_norm_rope(
                qkv, positions, table, self.num_heads, self.num_kv_heads, self.head_dim, qw, kw, self.eps
            )
            v = qkv[:, self.qkv_proj.q_size + self.qkv_proj.kv_size :]
            return self.attn(q.view(num_tokens, -1), k.view(num_tokens, -1), v, meta)
        cos_sin = rope
        q, k, v = qkv.split([self.qkv_proj.q_size, self.qkv_proj.kv_size, self.qkv_proj.kv_size], -1)
        q = q.reshape(num_tokens, self.num_heads, self.head_dim)
        k = k.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, *cos_sin), apply_rotary(k, *cos_sin)
        return self.attn(q.reshape(num_tokens, -1), k.reshape(num_tokens, -1), v, meta)


class GatedMLP(nn.Module):
    def __init__(self, spec: DecoderSpec) -> None:
        super().__init__()
        size = spec.intermediate_size
        self.gate_up_proj = MergedLinear(
            spec.hidden_size, (size, size), spec.mlp_bias, shard_names=("gate", "up")
        )
        self.act = SiluAndMul()
        self.down_proj = ReplicatedLinear(size, spec.hidden_size, spec.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, spec: DecoderSpec, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = DecoderAttention(spec, spec.sliding_windows[layer_idx])
        self.mlp = GatedMLP(spec)
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        # Steps of at most this many rows run the projections through ``kernels.gemv`` with the
        # norms and SiLU-and-mul fused in (4 launches instead of 7); 0: off. The model runner
        # sets it from RunnerConfig.small_batch_gemv_rows (triton backend).
        self.gemv_rows = 0
        self.gemv_pdl = False  # those GEMVs as programmatic dependent launches (small_batch_gemv_pdl)
        self.gemv_tiling: GemvTiling | None = None  # how they read the weights (small_batch_gemv_*)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        rope: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        qkv, residual = self.before_attention(x, residual)
        return self.after_attention(self.self_attn.attend_qkv(qkv, rope, meta), residual)

    # The layer in three parts, so that a runner can put everything but the attention (which reads
    # per-step lengths) in CUDA graphs: see ``DecoderModel.forward``.
    def before_attention(
        self, x: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Input norm (the residual add of the block before fused in) and the q/k/v projection:
        returns (qkv, residual)."""
        if 0 < x.shape[0] <= self.gemv_rows:
            from rollout.kernels.gemv import fused_gemv

            proj, norm = self.self_attn.qkv_proj, self.input_layernorm
            kw = dict(norm_weight=norm.weight, eps=norm.eps, pdl=self.gemv_pdl, tiling=self.gemv_tiling)
            if residual is None:
                return fused_gemv(x, proj.weight, proj.bias, **kw), x
            return fused_gemv(x, proj.weight, proj.bias, residual=residual, **kw)
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        return self.self_attn.qkv_proj(x), residual

    def after_attention(
        self, attn: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """o_proj, the post-attention norm (+ residual add) and the MLP: returns (x, residual)."""
        if 0 < attn.shape[0] <= self.gemv_rows:
            from rollout.kernels.gemv import fused_gemv

            o_proj, norm = self.self_attn.o_proj, self.post_attention_layernorm
            gate_up, down = self.mlp.gate_up_proj, self.mlp.down_proj
            pdl, tiling = self.gemv_pdl, self.gemv_tiling
            o = fused_gemv(attn.contiguous(), o_proj.weight, o_proj.bias, pdl=pdl, tiling=tiling)
            act, residual = fused_gemv(
                o, gate_up.weight, gate_up.bias, norm_weight=norm.weight, residual=residual,
                eps=norm.eps, silu_mul=True, pdl=pdl, tiling=tiling,
            )  # fmt: skip
            return fused_gemv(act, down.weight, down.bias, pdl=pdl, tiling=tiling), residual
        x, residual = self.post_attention_layernorm(self.self_attn.o_proj(attn), residual)
        return self.mlp(x), residual


class DecoderModel(nn.Module):
    def __init__(self, spec: DecoderSpec) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec, i) for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        # One table for all layers; looked up once per forward.
        self.rotary_emb = RotaryEmbedding(spec.head_dim, spec.max_position_embeddings, spec.rope)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        rope = self.rope_inputs(positions)
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, rope, meta)
        x, _ = self.norm(x, residual)
        return x

    def rope_inputs(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What each layer's attention takes for RoPE: (positions, the cos/sin table) for the fused
        kernels, which gather their rows themselves, else this step's (cos, sin) rows."""
        if self.layers and self.layers[0].self_attn.fused:
            return positions, self.rotary_emb.cos_sin_cache
        return self.rotary_emb(positions)

    # ``forward`` cut at each attention, for runners that capture the rest in CUDA graphs:
    # head_piece, then for each layer i its attention and piece i + 1 (middle pieces, then the
    # tail piece after the last layer) give the same result as ``forward``.
    def head_piece(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Embedding and layer 0 up to its attention: (qkv, residual)."""
        return self.layers[0].before_attention(self.embed_tokens(input_ids), None)

    def attention(
        self, i: int, qkv: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata
    ) -> torch.Tensor:
        """Layer i's attention on its packed q/k/v: [T, Hq * D] (``rope`` from ``rope_inputs``)."""
        return self.layers[i].self_attn.attend_qkv(qkv, rope, meta)

    def middle_piece(
        self, i: int, attn: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i - 1 after its attention, then layer i up to its own: (qkv, residual)."""
        x, residual = self.layers[i - 1].after_attention(attn, residual)
        return self.layers[i].before_attention(x, residual)

    def tail_piece(self, attn: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """The last layer after its attention and the final norm: hidden states."""
        x, residual = self.layers[-1].after_attention(attn, residual)
        return self.norm(x, residual)[0]


class DecoderForCausalLM(nn.Module):
    """Base of every family class; subclasses implement ``decoder_spec`` only.

    Engine-facing API (what the model runner calls):
    - ``Cls(hf_config)`` then ``.to(device, dtype)``;
    - ``forward(input_ids [T], positions [T], meta) -> hidden [T, hidden_size]`` over the flattened
      tokens of a step (no batch dim); the KV caches must be bound to ``attention_layers()`` first;
    - ``compute_logits(hidden [R, H]) -> [R, vocab]`` in the model dtype (the sampler upcasts);
    - ``load_weights`` / ``check_weights`` over HF checkpoint names (see ``rollout.models.weights``).
    """

    packed_modules_mapping: ClassVar[dict[str, list[str]]] = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }

    @staticmethod
    def decoder_spec(config: Any) -> DecoderSpec:
        """How this family's HF config maps onto the shared decoder."""
        raise NotImplementedError

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config
        self.spec = self.decoder_spec(config)
        self.model = DecoderModel(self.spec)
        tied = self.model.embed_tokens if self.spec.tie_word_embeddings else None
        self.lm_head = LMHead(self.spec.vocab_size, self.spec.hidden_size, tied_to=tied)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def attention_layers(self) -> list[Attention]:
        """The ``Attention`` modules in layer order (the runner binds one KV cache pair to each)."""
        return [layer.self_attn.attn for layer in self.model.layers]

    def ignored_weight_names(self) -> tuple[str, ...]:
        """Suffixes of checkpoint tensors to skip: HF's rotary buffers (recomputed here) and, when the
        head is tied, a saved ``lm_head.weight`` (the embedding is authoritative, as in HF)."""
        ignored = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")
        return (*ignored, "lm_head.weight") if self.spec.tie_word_embeddings else ignored

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy HF-named tensors in place into the parameters; returns the parameter names loaded.
        Raises ``ValueError`` (naming the tensor) on an unknown name, a bad shape or dtype, or, once
        ``weights`` is exhausted, a parameter nobody provided. Errors may come after earlier tensors
        were written: call ``check_weights`` first where that matters."""
        return load_weights(self, weights)

    def check_weights(self, specs: Iterable[tuple[str, tuple[int, ...], torch.dtype]]) -> None:
        """Validate ``(hf_name, shape, dtype)`` triples exactly as ``load_weights`` would, writing
        nothing; raises the same ``ValueError``s."""
        check_weights(self, specs)
