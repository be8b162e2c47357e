"""``LLM``: offline, synchronous generation over the in-process engine (or, with ``multiprocess=True``,
over an engine core process)."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

from tqdm.auto import tqdm

from rollout.client import EngineCoreClient
from rollout.control import check_pause_mode
from rollout.engine import EngineCore, EngineStats
from rollout.outputs import RequestOutput
from rollout.remote import RemoteEngine
from rollout.samplers.params import SamplingParams
from rollout.weight_sync.sender import Weights, WeightSender

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
        self._sender: WeightSender | None = None

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
        if self._sender is not None:
            self._sender.close()
            self._sender = None
        if self.remote is not None:
            self.remote.shutdown()

    # ---- weights and memory -------------------------------------------------------------------
    def update_weights(self, weights: Weights, version: int | None = None, pause: str = "keep") -> int:
        """Load new weights in place: an ``nn.Module`` with HF parameter names (plain, DDP, FSDP...),
        a state dict or ``(hf_name, tensor)`` pairs. In process they are copied directly; to an engine process
        they go over CUDA IPC (same GPU), NCCL (another GPU) or gloo (CPU): see
        ``rollout.weight_sync.WeightSender``, which this keeps open between calls. The whole update
        is validated first: a bad one raises ``ValueError`` and the old weights keep serving.
        Returns the new weight version (``version`` if given, which must grow; else current + 1)."""
        check_pause_mode(pause)  # in process it has no use, but a bad one is still a bad one
        if self._sender is None:
            self._sender = WeightSender(self)
        version_out = self._sender.push(weights, version=version, pause=pause)
        assert version_out is not None
        return version_out

    def update_weights_from_disk(self, path: str, version: int | None = None, pause: str = "keep") -> int:
        """Reload the weights from a safetensors directory (e.g. a trainer's ``save_pretrained``)."""
        check_pause_mode(pause)
        if self.engine is not None:
            return self.engine.update_weights_from_disk(str(path), version)
        return self._call("update_weights_from_disk", path=str(path), version=version, pause=pause)

    def sleep(self, level: int = 1) -> dict[str, float]:
        """Free device memory for a colocated trainer: level 1 frees the KV cache and moves the
        weights to host memory, level 2 frees both (send weights again after ``wake_up``)."""
        if self.engine is not None:
            return self.engine.sleep(level)
        return self._call("sleep", level=level)

    def wake_up(self, tags: list[str] | None = None) -> dict[str, Any]:
        """Restore what ``sleep`` freed: ``tags`` from ("weights", "kv_cache"), both by default."""
        if self.engine is not None:
            return self.engine.wake_up(tags)
        return self._call("wake_up", tags=tags)

    @property
    def weight_version(self) -> int:
        """The version of the weights serving now."""
        if self.engine is not None:
            return self.engine.weight_version
        return self._call("get_state")["weight_version"]

    def _call(self, method: str, **args: Any) -> Any:
        assert self.remote is not None
        return self.remote.client.call(method, **args)

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
        validated before any is queued, so bad input raises ValueError and queues nothing. Outputs of
        requests queued on ``self.engine`` directly that finish meanwhile are not returned."""
        if isinstance(prompts, str) or (
            isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)  # type: ignore[arg-type]
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompts)
        elif isinstance(sampling_params, Mapping):
            raise TypeError("sampling_params must be SamplingParams or a list of them, got a mapping: "
                            "use SamplingParams.from_dict(...)")  # fmt: skip
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
        results: dict[str, RequestOutput] = {}
        wanted = set(ids)
        queued: list[str] = []
        bar = tqdm(
            total=len(prompts), desc="generate", unit="prompt", disable=not use_tqdm, dynamic_ncols=True
        )
        try:
            for rid, (prompt_ids, text), p in zip(ids, tokenized, params, strict=True):
                engine.add_tokenized(rid, prompt_ids, text, p)  # the checked ids (prompts may be iterators)
                queued.append(rid)
            while len(results) < len(ids):
                for out in engine.step():
                    if out.request_id in wanted:  # not requests queued through the engine directly
                        results[out.request_id] = out
                        bar.update(1)
                if use_tqdm:
                    bar.set_postfix(out_tokens=engine.stats().num_output_tokens, refresh=False)
                if not engine.has_unfinished() and len(results) < len(ids):
                    raise RuntimeError("engine stopped with requests unfinished")  # internal invariant
        except BaseException:
            engine.abort([rid for rid in queued if rid not in results])
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
