"""``LLM``: offline, synchronous generation over the in-process engine."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from rollout.engine import EngineCore, EngineStats
from rollout.outputs import RequestOutput
from rollout.samplers.params import SamplingParams

Prompt = str | Sequence[int]


class LLM:
    """Generate from token-id (or text) prompts.

    >>> llm = LLM("tiny")
    >>> outs = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=8, temperature=0))
    >>> outs[0].outputs[0].token_ids  # 8 ids
    """

    def __init__(self, model: str, **engine_kwargs: Any) -> None:
        self.engine = EngineCore(model, **engine_kwargs)
        self._ids = itertools.count()

    def get_tokenizer(self) -> Any:
        return None if self.engine.detokenizer is None else self.engine.detokenizer.tokenizer

    def stats(self) -> EngineStats:
        return self.engine.stats()

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
        for prompt, p in zip(prompts, params, strict=True):
            engine.tokenize(prompt)
            engine.check_params(p)
        ids = [f"llm-{next(self._ids)}" for _ in prompts]
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
