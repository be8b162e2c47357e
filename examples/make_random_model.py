"""Write an HF model directory with random weights of a real architecture shape, for machines that
cannot download a checkpoint (benchmarks, RL step timing).

The shape comes from a weightless preset of ``rollout.presets`` (default ``qwen3-0.6b``); ``--set``
overrides config fields (e.g. a smaller copy for a CPU smoke test). The tokenizer is the tiny preset's
byte-level one (built locally, with a chat template): ids 0-255 are bytes, then 4 special tokens.
The model's vocabulary stays the preset's (151936 for Qwen3), so a random model samples ids the
tokenizer does not know; decoding skips them. ``eos_token_id`` is pointed at the tokenizer's
``<|im_end|>`` / ``<|endoftext|>``, so the engine's stop tokens and the tokenizer agree.

    python examples/make_random_model.py /tmp/qwen3-0.6b-random
    python examples/make_random_model.py /tmp/tiny-random --dtype float32 \
        --set num_hidden_layers=2 hidden_size=64 intermediate_size=128 num_attention_heads=4 \
              num_key_value_heads=2 head_dim=16 vocab_size=1024
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

SHAPES = ("qwen3-0.6b", "qwen3-8b", "llama3-8b")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``key=value`` pairs; values are parsed as JSON when they can be (ints, floats, lists, null)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {item!r}")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def make_random_model(
    out: str | Path,
    shape: str = "qwen3-0.6b",
    *,
    dtype: str = "bfloat16",
    overrides: dict[str, Any] | None = None,
    seed: int = 0,
    device: str = "cpu",
) -> Path:
    """Save a random-weight model of preset ``shape`` (plus ``overrides``) and a byte-level tokenizer
    with a chat template to ``out`` (safetensors, ``dtype``). Returns the directory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from rollout.presets import build_byte_tokenizer, resolve_model

    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    shape_dir, _ = resolve_model(shape)  # a directory holding only the preset's config.json
    fields = json.loads((Path(shape_dir) / "config.json").read_text())
    model_type = fields.pop("model_type")
    known = AutoConfig.for_model(model_type)
    for key in overrides or {}:
        if not hasattr(known, key):
            raise ValueError(f"{type(known).__name__} has no field {key!r}")
    fields.update(overrides or {})
    tokenizer = build_byte_tokenizer()
    if fields["vocab_size"] < len(tokenizer):
        raise ValueError(f"vocab_size {fields['vocab_size']} is below the tokenizer's {len(tokenizer)} ids")
    fields.update(
        eos_token_id=[tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id],
        bos_token_id=None,
        pad_token_id=tokenizer.pad_token_id,
    )
    # through the constructor, so derived fields (e.g. layer_types) follow the overrides
    config = AutoConfig.for_model(model_type, **fields)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.bos_token_id = None
    model.generation_config.pad_token_id = config.pad_token_id
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)  # safetensors
    tokenizer.save_pretrained(out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="directory to write")
    p.add_argument("--shape", default="qwen3-0.6b", choices=SHAPES)
    p.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="where the weights are initialized (cuda is faster)")
    args = p.parse_args(argv)
    start = time.perf_counter()
    out = make_random_model(
        args.out,
        args.shape,
        dtype=args.dtype,
        overrides=parse_overrides(args.set),
        seed=args.seed,
        device=args.device,
    )
    files = sorted(f.name for f in out.iterdir())
    size = sum(f.stat().st_size for f in out.iterdir()) / 2**20
    print(f"wrote {out} ({size:.0f} MiB: {', '.join(files)}) in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
