"""Text side of generation: encoding text prompts, stop strings, final output text, and the text of
streamed outputs (``IncrementalDetokenizer``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rollout.request import Request
from rollout.samplers.params import SamplingParams


class Detokenizer:
    """Wraps a Hugging Face tokenizer. Stop strings are checked on a request's text, extended after
    each new token by an ``IncrementalDetokenizer`` (a short window decoded per step, not the whole
    output), and searched only where a new match could be."""

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

    def check_stop(self, req: Request, search: bool = True) -> str | None:
        """Extend ``req.text`` by its new tokens; if a stop string now appears, cut the text there and
        return it. ``search=False`` only extends the text (stop strings are ignored before
        ``min_tokens``, and one that ended there is never matched later). The text grows only by
        whole characters (an incomplete UTF-8 one waits for its bytes), so what was searched never
        changes and only its last ``len(stop) - 1`` characters are searched again."""
        params = req.params
        scan = req.stop_scan
        if scan is None:
            scan = req.stop_scan = StopScan(IncrementalDetokenizer(self, params.skip_special_tokens))
        ids = req.output_token_ids
        searched = len(req.text)
        req.text += scan.text.step(ids[scan.fed :])
        scan.fed = len(ids)
        if not search:
            return None
        longest = max(len(s) for s in params.stop)
        search_from = max(0, searched - longest + 1)
        found: tuple[int, str] | None = None
        for stop in params.stop:
            idx = req.text.find(stop, search_from)
            if idx >= 0 and (found is None or idx < found[0]):
                found = (idx, stop)
        if found is None:
            return None
        idx, stop = found
        req.text = req.text[: idx + len(stop)] if params.include_stop_str_in_output else req.text[:idx]
        return stop

    def final_text(self, req: Request) -> str:
        """The sample's text: cut at its stop string; without the text of the EOS or stop token
        that ended it unless ``include_stop_str_in_output`` (as vLLM; the token id stays)."""
        if isinstance(req.stop_reason, str):
            return req.text  # cut at the stop string by check_stop
        ids = req.output_token_ids
        if req.finish_reason == "stop" and not req.params.include_stop_str_in_output:
            ids = ids[:-1]
        return self.decode(ids, req.params.skip_special_tokens)


_MAX_WAIT = 8  # unread tokens ending inside a character before the text is read up to 3 from the end


class IncrementalDetokenizer:
    """The text of one sample, handed out piece by piece as its tokens arrive.

    The prefix/read-offset scheme of TGI and vLLM: a step decodes only a short window (the tokens of
    the previous step's text plus the new ones) and keeps what the new tokens added, so it costs
    O(window + new tokens). Text that ends in an incomplete UTF-8 character (U+FFFD) waits for the
    bytes that complete it (or show it invalid: see ``_MAX_WAIT``); the last ``holdback`` characters
    wait until the end while a stop string could still cut them. At the end, the core's final text
    (cut at the stop string) wins.

    Decoding starts without prompt context, as the core's final text does (``final_text`` decodes the
    output ids alone), so the pieces add up to exactly that text.
    """

    def __init__(self, detokenizer: Detokenizer, skip_special_tokens: bool = True, holdback: int = 0) -> None:
        self.detokenizer = detokenizer
        self.skip_special_tokens = skip_special_tokens
        self.holdback = holdback
        self._window: list[int] = []  # the previous step's tokens (prefix), then tokens not yet read
        self._read = 0  # window tokens before this one are decoded already
        self._pending = ""  # decoded text not handed out yet: the held back tail
        self._sent: list[str] = []  # the text handed out, in pieces (joined when asked for)
        self._num_sent = 0  # its length
        self.finished = False

    @classmethod
    def for_params(cls, detokenizer: Detokenizer, params: SamplingParams) -> IncrementalDetokenizer:
        """One sample's detokenizer under ``params`` (``skip_special_tokens``, ``stop``)."""
        # The core may cut up to len(stop) - 1 characters of already checked text (a match that starts
        # in it); with include_stop_str_in_output it cuts after the match, which ends past all of it.
        cuts_back = bool(params.stop) and not params.include_stop_str_in_output
        holdback = max(len(s) for s in params.stop) - 1 if cuts_back else 0
        return cls(detokenizer, params.skip_special_tokens, holdback)

    @property
    def text(self) -> str:
        """The text handed out so far."""
        if len(self._sent) > 1:
            self._sent = ["".join(self._sent)]
        return self._sent[0] if self._sent else ""

    def step(self, new_ids: Sequence[int]) -> str:
        """The text to hand out for a sample's new tokens ("" while it waits for more)."""
        if self.finished:
            raise RuntimeError("this sample has finished")
        if new_ids:
            self._decode(new_ids, final=False)
        upto = len(self._pending) - self.holdback
        if upto <= 0:
            return ""
        piece, self._pending = self._pending[:upto], self._pending[upto:]
        return self._send(piece)

    def finish(self, new_ids: Sequence[int], final_text: str | None) -> str:
        """Everything not handed out yet, at the sample's end (its last tokens are ``new_ids``).
        ``final_text``, the core's text (cut at a stop string), is authoritative when given. Should
        the text handed out not be its prefix (a tokenizer whose decoding depends on what follows: it
        should not happen), sent text cannot be taken back: the rest is ``final_text`` past as many
        characters as were sent, so the pieces add up to its length and every later character is
        right. Later calls return ""."""
        if self.finished:
            return ""
        self.finished = True
        if final_text is None:
            self._decode(new_ids, final=True)
            rest = self._pending
        else:
            rest = final_text[self._num_sent :]
        self._pending = ""
        return self._send(rest)

    def _decode(self, new_ids: Sequence[int], final: bool) -> None:
        window = self._window
        window.extend(new_ids)
        decode, skip = self.detokenizer.decode, self.skip_special_tokens
        before = decode(window[: self._read], skip)
        after = decode(window, skip)
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self._pending += after[len(before) :]
            del window[: self._read]  # the tokens just read become the next window's prefix
            self._read = len(window)
        elif len(window) - self._read > _MAX_WAIT:
            # Still incomplete after many tokens: bytes that are invalid for good (an untrained
            # model's), or tokens that each end inside a character. Read up to 3 tokens from the
            # end (the bytes after them decide any character they end in) if their text stays as
            # it is in the whole window's; else the window grows, as before
            cut = len(window) - 3
            done = decode(window[:cut], skip)
            if len(done) > len(before) and after.startswith(done):
                self._pending += done[len(before) :]
                del window[: self._read]
                self._read = cut - self._read

    def _send(self, piece: str) -> str:
        if piece:
            self._sent.append(piece)
            self._num_sent += len(piece)
        return piece


@dataclass
class StopScan:
    """A request's incremental text for stop strings: its detokenizer and the output ids fed to it."""

    text: IncrementalDetokenizer
    fed: int = 0
