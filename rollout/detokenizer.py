"""Text side of generation: encoding text prompts, stop strings, final output text."""

from __future__ import annotations

import os
from typing import Any

from rollout.request import Request


class Detokenizer:
    """Wraps a Hugging Face tokenizer. Stop strings are checked by decoding a request's output after
    each new token and searching only the part that could contain a new match."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(cls, path: str) -> Detokenizer | None:
        """The tokenizer saved in a model directory, or None when the directory has none."""
        names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
        if not any(os.path.exists(os.path.join(path, n)) for n in names):
            return None
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(path))

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def check_stop(self, req: Request) -> str | None:
        """Update ``req.text``; if a stop string now appears, cut the text there and return it."""
        params = req.params
        text = self.decode(req.output_token_ids, params.skip_special_tokens)
        longest = max(len(s) for s in params.stop)
        search_from = max(0, len(req.text) - longest + 1)
        found: tuple[int, str] | None = None
        for stop in params.stop:
            idx = text.find(stop, search_from)
            if idx >= 0 and (found is None or idx < found[0]):
                found = (idx, stop)
        if found is None:
            req.text = text
            return None
        idx, stop = found
        req.text = text[: idx + len(stop)] if params.include_stop_str_in_output else text[:idx]
        return stop

    def final_text(self, req: Request) -> str:
        if req.params.stop:
            return req.text  # kept current (and cut at the stop string) by check_stop
        return self.decode(req.output_token_ids, req.params.skip_special_tokens)
