"""Built-in models that need nothing downloaded.

- ``tiny``: a small Qwen3-architecture model with random weights and a byte-level tokenizer, built
  locally on first use (the README's main job and the tests run on it).
- ``qwen3-0.6b``, ``qwen3-8b``, ``llama3-8b``: real architecture shapes with no weights; they load
  with random ("dummy") weights for benchmarks.
Presets are written once under the cache directory (``$ROLLOUT_CACHE`` or
``~/.cache/rollout-engine``), atomically, so concurrent first uses are safe.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import MappingProxyType

TINY_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>")
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _qwen3(**overrides: object) -> dict:
    cfg = dict(
        architectures=["Qwen3ForCausalLM"],
        model_type="qwen3",
        hidden_act="silu",
        attention_bias=False,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        max_position_embeddings=40960,
        tie_word_embeddings=True,
        torch_dtype="bfloat16",
        bos_token_id=151643,
        eos_token_id=151645,
    )
    cfg.update(overrides)
    return cfg


def _llama3_8b() -> dict:
    return dict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=128256,
        hidden_act="silu",
        rms_norm_eps=1e-5,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
        bos_token_id=128000,
        eos_token_id=128001,
    )


# name -> HF config.json contents of a weightless shape preset
_SHAPES: MappingProxyType[str, Callable[[], dict]] = MappingProxyType(
    {
        "qwen3-0.6b": lambda: _qwen3(
            hidden_size=1024,
            intermediate_size=3072,
            num_hidden_layers=28,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
            vocab_size=151936,
        ),
        "qwen3-8b": lambda: _qwen3(
            hidden_size=4096,
            intermediate_size=12288,
            num_hidden_layers=36,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            vocab_size=151936,
            tie_word_embeddings=False,
        ),
        "llama3-8b": _llama3_8b,
    }
)
PRESETS = ("tiny", *_SHAPES)


def cache_root() -> Path:
    return Path(os.environ.get("ROLLOUT_CACHE") or Path.home() / ".cache" / "rollout-engine")


def resolve_model(model: str, load_format: str = "auto") -> tuple[str, str]:
    """Map a model argument (a local HF directory or a preset name) to (directory, load format)."""
    if os.path.isdir(model):
        return model, load_format
    if model == "tiny":
        return str(_materialize("tiny-v1", _write_tiny)), load_format
    if model in _SHAPES:
        if load_format not in ("auto", "dummy"):
            raise ValueError(f"preset {model!r} has no weights; use load_format='dummy', not {load_format!r}")
        config = _SHAPES[model]()
        return str(_materialize(f"{model}-v1", lambda d: _write_json(d / "config.json", config))), "dummy"
    raise ValueError(
        f"model {model!r} is neither a local directory nor a preset (presets: {', '.join(PRESETS)})"
    )


def _materialize(name: str, write: Callable[[Path], None]) -> Path:
    target = cache_root() / name
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        write(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race; its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2))


def build_byte_tokenizer():
    """A byte-level tokenizer: ids 0-255 are bytes, then the special tokens. Lossless on any text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_chars = bytes_to_unicode()
    tok = Tokenizer(models.BPE(vocab={byte_chars[i]: i for i in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(TINY_SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        chat_template=TINY_CHAT_TEMPLATE,
    )


def _write_tiny(d: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    tokenizer = build_byte_tokenizer()
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id
    cfg = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=list(eos),
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(d)
    tokenizer.save_pretrained(d)
