"""What the engine needs to know about a checkpoint, resolved once from its config.json."""

from __future__ import annotations

import json
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from transformers import AutoConfig, PretrainedConfig

from rollout.models.registry import get_model_class

_DTYPE_NAMES = MappingProxyType(
    {
        "float32": torch.float32,
        "fp32": torch.float32,
        "float": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
        "half": torch.float16,
    }
)


def _as_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    return _DTYPE_NAMES.get(str(value).removeprefix("torch."))


def resolve_dtype(
    dtype: str | torch.dtype, hf_config: PretrainedConfig, device: str | torch.device | None = None
) -> torch.dtype:
    """The dtype the model runs in. ``"auto"``: float32 on the CPU (half-precision matmuls there are
    slow and only the torch reference kernels run); elsewhere the checkpoint's ``dtype``/``torch_dtype``
    when it is bfloat16/float16, else bfloat16 (an fp32 checkpoint is served in half precision, as
    vLLM does; ask for "float32" explicitly to keep it). ``device`` None means CUDA if available."""
    if dtype != "auto":
        resolved = _as_dtype(dtype)
        if resolved not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"unsupported dtype {dtype!r}; use 'auto', 'float32', 'bfloat16' or 'float16'")
        return resolved
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if torch.device(device).type == "cpu":
        return torch.float32
    # transformers 5 names it `dtype`; older configs only carry `torch_dtype`.
    saved = getattr(hf_config, "dtype", None) or hf_config.to_dict().get("torch_dtype")
    saved = _as_dtype(saved)
    return saved if saved in (torch.bfloat16, torch.float16) else torch.bfloat16


def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return (int(value),) if isinstance(value, int) else tuple(int(v) for v in value)


@dataclass(frozen=True)
class ModelConfig:
    """A checkpoint's shape and serving settings. Build with ``from_pretrained`` (a local dir) or
    ``from_hf`` (an in-memory HF config)."""

    path: str  # checkpoint directory ("" when built from an in-memory config)
    hf_config: PretrainedConfig = field(repr=False, compare=False)  # the HF config, as transformers read it
    architecture: str  # e.g. "LlamaForCausalLM": a key of the model registry
    dtype: torch.dtype  # dtype the weights and activations run in
    vocab_size: int  # rows of the embedding / logits width
    hidden_size: int  # model width
    num_layers: int  # decoder layers = KV cache tensors per K/V
    num_heads: int  # query heads
    num_kv_heads: int  # KV heads (GQA when < num_heads)
    head_dim: int  # per-head dim of q/k/v (the KV cache's last dim)
    max_model_len: int  # longest sequence (prompt + output) served
    eos_token_ids: tuple[int, ...]  # generation_config.json's eos_token_id, else config.json's
    sliding_window: int | None  # window every layer uses; None if any layer attends fully

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        dtype: str | torch.dtype = "auto",
        max_model_len: int | None = None,
        device: str | torch.device | None = None,
    ) -> ModelConfig:
        """Read ``path/config.json`` (and ``generation_config.json`` if present); local only.
        ``device`` only resolves ``dtype="auto"`` (see ``resolve_dtype``)."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"model directory {str(path)!r} does not exist")
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"no config.json in {str(path)!r}")
        hf_config = AutoConfig.from_pretrained(str(path), local_files_only=True)
        eos = None
        gen_path = path / "generation_config.json"
        if gen_path.is_file():
            eos = json.loads(gen_path.read_text()).get("eos_token_id")
        return cls.from_hf(
            hf_config,
            path=str(path),
            dtype=dtype,
            max_model_len=max_model_len,
            device=device,
            eos_token_id=eos,
        )

    @classmethod
    def from_hf(
        cls,
        hf_config: PretrainedConfig,
        *,
        path: str = "",
        dtype: str | torch.dtype = "auto",
        max_model_len: int | None = None,
        device: str | torch.device | None = None,
        eos_token_id: int | list[int] | None = None,
    ) -> ModelConfig:
        """Resolve an HF config. ``eos_token_id`` overrides the config's (generation config value).
        ``ValueError`` for an unsupported architecture or a bad ``max_model_len``."""
        architectures = getattr(hf_config, "architectures", None) or []
        if not architectures:
            raise ValueError("config has no 'architectures' entry; cannot pick a model class")
        if getattr(hf_config, "quantization_config", None):
            raise ValueError("quantized checkpoints (config.quantization_config) are not supported")
        architecture = architectures[0]
        # The model's own spec gives head_dim, KV heads and windows exactly as the model will build them.
        spec = get_model_class(architecture).decoder_spec(hf_config)
        limit = spec.max_position_embeddings
        if max_model_len is None:
            max_model_len = limit
        elif (
            isinstance(max_model_len, bool)
            or not isinstance(max_model_len, numbers.Integral)
            or not 0 < max_model_len <= limit
        ):
            raise ValueError(
                f"max_model_len={max_model_len!r} must be an int in [1, max_position_embeddings={limit}]"
            )
        max_model_len = int(max_model_len)
        windows = set(spec.sliding_windows)
        return cls(
            path=path,
            hf_config=hf_config,
            architecture=architecture,
            dtype=resolve_dtype(dtype, hf_config, device),
            vocab_size=spec.vocab_size,
            hidden_size=spec.hidden_size,
            num_layers=spec.num_layers,
            num_heads=spec.num_heads,
            num_kv_heads=spec.num_kv_heads,
            head_dim=spec.head_dim,
            max_model_len=max_model_len,
            eos_token_ids=_eos_ids(eos_token_id if eos_token_id is not None else hf_config.eos_token_id),
            sliding_window=windows.pop() if len(windows) == 1 else None,
        )
