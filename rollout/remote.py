"""Synchronous generation over an engine core process (``LLM(..., multiprocess=True)``).

Text prompts are tokenized here (with the model's tokenizer, loaded on first use) so that every
prompt is validated before any request is sent, as in the in-process ``LLM``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

from rollout.client import EngineCoreClient, EngineDeadError
from rollout.detokenizer import Detokenizer
from rollout.engine import EngineStats
from rollout.messages import AbortRequests, AddRequest, Outputs, RequestFailed
from rollout.outputs import RequestOutput
from rollout.samplers.params import SamplingParams
from rollout.stream import OutputAccumulator
from rollout.validation import check_params, prompt_to_ids


class RemoteEngine:
    """A synchronous view of one engine core process."""

    def __init__(self, model: str, **engine_kwargs: Any) -> None:
        self.client = EngineCoreClient(model, **engine_kwargs)
        self._detokenizer: Detokenizer | None = None

    @property
    def detokenizer(self) -> Detokenizer | None:
        if self._detokenizer is None and self.client.info.has_tokenizer:
            self._detokenizer = Detokenizer.from_pretrained(self.client.model_path)
        return self._detokenizer

    def tokenize(self, prompt: str | Sequence[int]) -> tuple[list[int], str | None]:
        """Validate a prompt against the engine and return its token ids (and text, if given)."""
        info = self.client.info
        detok = self.detokenizer if isinstance(prompt, str) else None  # load the tokenizer only for text
        encode = None if detok is None else detok.encode
        return prompt_to_ids(prompt, encode, info.vocab_size, info.max_total_tokens)

    def check_params(self, params: SamplingParams) -> None:
        check_params(params, self.client.info.vocab_size, self.client.info.has_tokenizer)

    def stats(self) -> EngineStats:
        return EngineStats(**self.client.call("get_state")["stats"])

    def generate(
        self,
        request_ids: list[str],
        prompts: list[tuple[list[int], str | None]],
        params: list[SamplingParams],
        on_finished: Callable[[int], None],
    ) -> dict[str, RequestOutput]:
        """Send validated requests and wait for all of them; ``on_finished(num_output_tokens)`` is
        called as each one finishes. On any error (also KeyboardInterrupt) the rest are aborted."""
        state = self.client.call("get_state")
        if state["state"] != "running":  # its requests would be held, and nothing here can resume it
            detail = "" if state["weights_valid"] else " (weights incomplete: send a complete update)"
            raise RuntimeError(f"the engine is {state['state']}{detail}: generate needs it running")
        accs = {
            rid: OutputAccumulator(rid, ids, text, p.n, bool(p.logprobs))
            for rid, (ids, text), p in zip(request_ids, prompts, params, strict=True)
        }
        results: dict[str, RequestOutput] = {}
        try:
            for rid, (ids, _), p in zip(request_ids, prompts, params, strict=True):
                self.client.send(AddRequest(rid, ids, None, p.to_dict()))
            while len(results) < len(accs):
                for msg in self.client.recv(0.25):
                    if isinstance(msg, Outputs):
                        for delta in msg.deltas:
                            acc = accs.get(delta.request_id)
                            if acc is None:
                                continue  # a request of an earlier, interrupted call
                            acc.apply(delta)
                            if acc.finished:
                                results[delta.request_id] = out = acc.cumulative()
                                on_finished(sum(len(c.token_ids) for c in out.outputs))
                        for rid, i, token, logprob, version in msg.tokens.rows():
                            acc = accs.get(rid)
                            if acc is not None:  # tokens never finish a prompt: no result here
                                acc.add_token(i, token, logprob, version)
                    elif isinstance(msg, RequestFailed) and msg.request_id in accs:
                        raise (TypeError if msg.error_type == "TypeError" else ValueError)(msg.message)
        except BaseException:
            with contextlib.suppress(EngineDeadError):  # a dead engine holds nothing to abort
                self.client.send(AbortRequests([rid for rid in accs if rid not in results]))
            raise
        return results

    def shutdown(self) -> None:
        self.client.shutdown()
