"""``LLM``: offline, synchronous generation over the in-process engine (or, with ``multiprocess=True``,
over an engine core process)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from rollout.client import EngineCoreClient
from rollout.engine import EngineCore, EngineStats
from rollout.outputs import RequestOutput
from rollout.remote import RemoteEngine
from rollout.samplers.params import SamplingParams

Prompt = str | Sequence[int]


class LLM:
    """Generate from token-id (or text) prompts.

    >>> llm = LLM("tiny")
    >>> outs = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=8, temperature=0))
    >>> outs[0].outputs[0].token_ids  # 8 ids
    """

    def __init__(self, model: str, *, multiprocess: bool = False, **engine_kwargs: Any) -> None:
        """``engine_kwargs`` are ``EngineCore``'s. With ``multiprocess=True`` the engine runs in its own
        process (``self.engine`` is None, ``self.client`` talks to it); call ``shutdown()`` or use
        ``with`` to stop it early (it also stops when the LLM is collected or at exit)."""
        self.engine: EngineCore | None = None
        self.remote: RemoteEngine | None = None
        if multiprocess:
            self.remote = RemoteEngine(model, **engine_kwargs)
        else:
            self.engine = EngineCore(model, **engine_kwargs)
        self._ids = itertools.count()

    @property
    def client(self) -> EngineCoreClient | None:
        return None if self.remote is None else self.remote.client

    def get_tokenizer(self) -> Any:
        detok = (self.engine or self.remote).detokenizer  # type: ignore[union-attr]
        return None if detok is None else detok.tokenizer

    def stats(self) -> EngineStats:
        return self.engine.stats() if self.engine is not None else self.remote.stats()  # type: ignore[union-attr]

    def shutdown(self) -> None:
        """Stop the engine process (multiprocess mode; idempotent)."""
        if self.remote is not None:
            self.remote.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in prompt order. A prompt is a string (needs a
        tokenizer) or a list of token ids; one list of ints is one prompt. Every prompt and parameter is
        validated before any is queued, so bad input raises ValueError and queues nothing."""
        if isinstance(prompts, str) or (
            isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)  # type: ignore[arg-type]
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"got {len(params)} sampling params for {len(prompts)} prompts")
        engine = self.engine
        checker = engine or self.remote
        tokenized = []
        for prompt, p in zip(prompts, params, strict=True):
            tokenized.append(checker.tokenize(prompt))  # type: ignore[union-attr]
            checker.check_params(p)  # type: ignore[union-attr]
        ids = [f"llm-{next(self._ids)}" for _ in prompts]
        if engine is None:
            return self._generate_remote(ids, tokenized, params, use_tqdm)
        for rid, prompt, p in zip(ids, prompts, params, strict=True):
            engine.add_request(rid, prompt, p)
        results: dict[str, RequestOutput] = {}
        bar = tqdm(
            total=len(prompts), desc="generate", unit="prompt", disable=not use_tqdm, dynamic_ncols=True
        )
        try:
            while len(results) < len(ids):
                for out in engine.step():
                    results[out.request_id] = out
                    bar.update(1)
                bar.set_postfix(out_tokens=engine.stats().num_output_tokens, refresh=False)
                if not engine.has_unfinished() and len(results) < len(ids):
                    raise RuntimeError("engine stopped with requests unfinished")  # internal invariant
        except BaseException:
            engine.abort([rid for rid in ids if rid not in results])
            raise
        finally:
            bar.close()
        return [results[rid] for rid in ids]

    def _generate_remote(
        self,
        ids: list[str],
        prompts: list[tuple[list[int], str | None]],
        params: list[SamplingParams],
        use_tqdm: bool,
    ) -> list[RequestOutput]:
        bar = tqdm(total=len(ids), desc="generate", unit="prompt", disable=not use_tqdm, dynamic_ncols=True)
        out_tokens = 0

        def on_finished(num_tokens: int) -> None:
            nonlocal out_tokens
            out_tokens += num_tokens
            bar.update(1)
            bar.set_postfix(out_tokens=out_tokens, refresh=False)

        try:
            results = self.remote.generate(ids, prompts, params, on_finished)  # type: ignore[union-attr]
        finally:
            bar.close()
        return [results[rid] for rid in ids]
