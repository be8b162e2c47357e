"""Prompt sets for RL: local json / jsonl / parquet / csv files (through ``datasets``) into batches of
token ids rendered with the tokenizer's chat template.

A row's prompt is a string (sent as one user message) or a list of chat messages
(``[{"role": "user", "content": "..."}]``). Other columns ride along in ``PromptBatch.rows`` (e.g.
the reference answer a reward function needs).

    >>> ds = load_prompt_dataset("prompts.jsonl")
    >>> for batch in prompt_batches(ds, tokenizer, batch_size=32, seed=0):
    ...     rollouts = client.generate(batch.prompt_ids, n=8, params)

``datasets`` is an optional dependency (``pip install rollout-engine[data]``).
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass
class PromptBatch:
    """One batch of prompts, tokenized."""

    prompt_ids: list[list[int]]  # per row: chat-templated prompt token ids (generation prompt added)
    rows: list[dict[str, Any]]  # per row: the dataset row as loaded (all columns)
    indices: list[int]  # per row: its index in the dataset


def load_prompt_dataset(path: str | Sequence[str], split: str = "train") -> Any:
    """Load local ``.json``/``.jsonl``/``.parquet``/``.csv`` file(s) (one format per call) as a
    ``datasets.Dataset``. Nothing is downloaded."""
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("loading prompt files needs `datasets`: pip install 'rollout-engine[data]'") from e
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if not paths:
        raise ValueError("no prompt files given")
    formats = set()
    for p in paths:
        p = os.fspath(p)
        if not os.path.isfile(p):
            raise ValueError(f"prompt file {p!r} does not exist")
        ext = os.path.splitext(p)[1].lower()
        if ext not in _FORMATS:
            raise ValueError(f"prompt file {p!r}: unsupported extension {ext!r} (use {', '.join(_FORMATS)})")
        if os.path.getsize(p) == 0:  # datasets raised a bare StopIteration for an empty .jsonl
            raise ValueError(f"prompt file {p!r} is empty")
        formats.add(_FORMATS[ext])
    if len(formats) != 1:
        raise ValueError(f"prompt files mix formats {sorted(formats)}; load them one format at a time")
    files = [os.fspath(p) for p in paths]
    try:
        return datasets.load_dataset(formats.pop(), data_files=files, split=split)
    except (StopIteration, datasets.exceptions.DatasetGenerationError) as e:
        raise ValueError(f"prompt files {files} hold no rows: {e!r}") from None
    except ValueError as e:  # e.g. 'Instruction "train" corresponds to no data!' for [] or a bare header
        raise ValueError(f"prompt files {files}: {e}") from None


def to_messages(prompt: Any, system_prompt: str | None = None) -> list[dict[str, str]]:
    """A row's prompt as chat messages: a string becomes one user message."""
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    elif (
        isinstance(prompt, Sequence)
        and prompt
        and all(isinstance(m, Mapping) and "role" in m and "content" in m for m in prompt)
    ):
        messages = [{"role": m["role"], "content": m["content"]} for m in prompt]
    else:
        raise ValueError(f"a prompt must be a string or a list of {{role, content}} messages, got {prompt!r}")
    if system_prompt is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return messages


def encode_prompt(
    tokenizer: Any,
    prompt: Any,
    *,
    system_prompt: str | None = None,
    chat: bool = True,
    template_kwargs: Mapping[str, Any] | None = None,
    special_tokens: bool = False,
) -> list[int]:
    """Token ids of one prompt: rendered with the chat template (generation prompt added; with
    ``template_kwargs``, e.g. ``{"enable_thinking": False}``, ``tools`` or ``chat_template``) when
    ``chat`` and the tokenizer has one, else the raw string encoded, with the tokenizer's special
    tokens (BOS) only if ``special_tokens``."""
    kwargs = dict(template_kwargs or {})
    if chat and (kwargs.get("chat_template") or getattr(tokenizer, "chat_template", None)):
        text = tokenizer.apply_chat_template(
            to_messages(prompt, system_prompt), tokenize=False, add_generation_prompt=True, **kwargs
        )
        special_tokens = False  # a rendered template holds its own
    elif isinstance(prompt, str):
        text = prompt if system_prompt is None else system_prompt + prompt
    else:
        raise ValueError("message-list prompts need a tokenizer with a chat template")
    ids = tokenizer.encode(text, add_special_tokens=special_tokens)
    if not ids:
        raise ValueError(f"prompt {prompt!r} encodes to no tokens")
    return list(ids)


def prompt_batches(
    dataset: Any,
    tokenizer: Any,
    batch_size: int,
    *,
    field: str = "prompt",
    system_prompt: str | None = None,
    chat: bool = True,
    max_prompt_len: int | None = None,
    shuffle: bool = True,
    seed: int = 0,
    drop_last: bool = False,
    epochs: int = 1,
) -> Iterator[PromptBatch]:
    """Yield tokenized batches from a dataset (anything indexable yielding row dicts, e.g. a
    ``datasets.Dataset`` or a list of dicts). Prompts longer than ``max_prompt_len`` are skipped
    (an RL loop cannot learn from a prompt the engine must reject)."""
    for name, value in (("batch_size", batch_size), ("epochs", epochs)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    columns = getattr(dataset, "column_names", None)
    if columns is not None and field not in columns:
        raise ValueError(f"dataset has no column {field!r} (columns: {columns})")
    rng = random.Random(seed)
    for _ in range(epochs):
        order = list(range(len(dataset)))
        if shuffle:
            rng.shuffle(order)
        ids: list[list[int]] = []
        rows: list[dict[str, Any]] = []
        idx: list[int] = []
        for i in order:
            row = dict(dataset[i])
            tokens = encode_prompt(tokenizer, row[field], system_prompt=system_prompt, chat=chat)
            if max_prompt_len is not None and len(tokens) > max_prompt_len:
                continue
            ids.append(tokens)
            rows.append(row)
            idx.append(i)
            if len(ids) == batch_size:
                yield PromptBatch(ids, rows, idx)
                ids, rows, idx = [], [], []
        if ids and not drop_last:
            yield PromptBatch(ids, rows, idx)
