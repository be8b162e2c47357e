"""``RolloutClient``: the trainer-facing handle on a rollout engine, and ``RolloutBatch``, what it returns.

An RL loop submits a batch of prompts (token ids) with ``n`` samples each and gets back, per sample,
the completion ids, the sampled tokens' logprobs, a loss mask, the finish reason and the weight
version of every token. Rows are prompt-major: sample ``j`` of prompt ``i`` is row ``i * n + j``.

Logprob alignment (the one contract every consumer relies on): ``logprobs[r][t]`` is the logprob of
``completion_ids[r][t]`` given the prompt and ``completion_ids[r][:t]``, under the distribution the
engine sampled from (``logprobs_mode="processed"``, forced here). In the padded form
(``RolloutBatch.padded``) the same number sits at the token's own position in ``input_ids``, so a
trainer's recomputation ``log_softmax(logits[:, t - 1])[input_ids[:, t]]`` lines up with column ``t``
(see ``sequence_logprobs``).

Backends: ``RolloutClient.local(model, multiprocess=...)`` runs an ``LLM`` in this process or in its own
engine process; ``RolloutClient.from_llm(llm)`` wraps an existing one; ``HTTPRolloutClient``
(``rollout.integrations.http_rollout_client``, also importable from here) talks to a running server's
native route.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from rollout.outputs import RequestOutput
from rollout.samplers.params import SamplingParams

FINISH_REASONS = ("stop", "length", "abort")


@dataclass
class PaddedRollout:
    """A ``RolloutBatch`` as right-padded tensors over prompt + completion (``B`` rows, ``T`` columns)."""

    input_ids: torch.Tensor  # [B, T] long: prompt then completion, right-padded with pad_token_id
    attention_mask: torch.Tensor  # [B, T] long: 1 on real tokens (prompt and completion)
    loss_mask: torch.Tensor  # [B, T] float: 1 on completion tokens that count in the loss
    logprobs: torch.Tensor  # [B, T] float: the engine's logprob of input_ids[:, t] at column t, 0 elsewhere
    prompt_lens: torch.Tensor  # [B] long: prompt length of each row (completion starts there)
    completion_lens: torch.Tensor  # [B] long


@dataclass
class RolloutBatch:
    """The samples of one generate call, ragged (one list per sample), prompt-major."""

    prompt_ids: list[list[int]]  # per sample: its prompt's token ids (repeated n times)
    completion_ids: list[list[int]]  # per sample: generated ids (the stop token included when it ended it)
    logprobs: list[list[float]]  # per sample, per completion token: the sampled token's logprob (processed)
    loss_masks: list[list[int]]  # per sample, per completion token: 1 = train on it, 0 = ignore
    weight_versions: list[list[int]]  # per sample, per completion token: weight version that produced it
    finish_reasons: list[str]  # per sample: "stop" | "length" | "abort"
    group_ids: list[int]  # per sample: index of its prompt in the submitted batch
    n: int  # samples per prompt
    texts: list[str | None] = field(default_factory=list)  # per sample, when the engine detokenized

    def __len__(self) -> int:
        return len(self.completion_ids)

    @property
    def num_prompts(self) -> int:
        return len(self) // self.n if self.n else 0

    @property
    def min_weight_version(self) -> int | None:
        """The oldest weight version behind any token (None for an empty batch): off-policy lag."""
        versions = [v for vs in self.weight_versions for v in vs]
        return min(versions) if versions else None

    def padded(self, pad_token_id: int = 0, device: torch.device | str | None = None) -> PaddedRollout:
        """Right-padded prompt + completion tensors with logprobs and loss mask at token positions."""
        if not len(self):
            raise ValueError("cannot pad an empty RolloutBatch")
        lens = [len(p) + len(c) for p, c in zip(self.prompt_ids, self.completion_ids, strict=True)]
        B, T = len(self), max(lens)
        input_ids = torch.full((B, T), pad_token_id, dtype=torch.long)
        attention = torch.zeros((B, T), dtype=torch.long)
        loss_mask = torch.zeros((B, T), dtype=torch.float32)
        logprobs = torch.zeros((B, T), dtype=torch.float32)
        for r, (p, c) in enumerate(zip(self.prompt_ids, self.completion_ids, strict=True)):
            P, C = len(p), len(c)
            input_ids[r, : P + C] = torch.tensor(p + c, dtype=torch.long)
            attention[r, : P + C] = 1
            if C:
                loss_mask[r, P : P + C] = torch.tensor(self.loss_masks[r], dtype=torch.float32)
                logprobs[r, P : P + C] = torch.tensor(self.logprobs[r], dtype=torch.float32)
        prompt_lens = torch.tensor([len(p) for p in self.prompt_ids], dtype=torch.long)
        completion_lens = torch.tensor([len(c) for c in self.completion_ids], dtype=torch.long)
        out = PaddedRollout(input_ids, attention, loss_mask, logprobs, prompt_lens, completion_lens)
        if device is not None:
            for name in (
                "input_ids",
                "attention_mask",
                "loss_mask",
                "logprobs",
                "prompt_lens",
                "completion_lens",
            ):
                setattr(out, name, getattr(out, name).to(device))
        return out

    @classmethod
    def from_outputs(
        cls, outputs: Sequence[RequestOutput], n: int, *, mask_truncated: bool = False
    ) -> RolloutBatch:
        """Flatten engine outputs (one per prompt, ``n`` samples each) into a batch. Aborted samples are
        masked out (they were cut off by a pause, not by the policy); with ``mask_truncated`` so are
        samples that hit ``max_tokens`` (a common RL choice: no credit assignment for unfinished text)."""
        batch = cls([], [], [], [], [], [], [], n, [])
        for g, out in enumerate(outputs):
            if len(out.outputs) != n:
                raise ValueError(f"prompt {g} has {len(out.outputs)} samples, expected n={n}")
            for c in sorted(out.outputs, key=lambda c: c.index):
                if len(c.logprobs) != len(c.token_ids) or len(c.weight_versions) != len(c.token_ids):
                    raise ValueError(f"prompt {g} sample {c.index}: logprobs/versions not aligned to tokens")
                reason = c.finish_reason or "abort"
                keep = reason != "abort" and not (mask_truncated and reason == "length")
                batch.prompt_ids.append(list(out.prompt_token_ids))
                batch.completion_ids.append(list(c.token_ids))
                batch.logprobs.append([float(x) for x in c.logprobs])
                batch.loss_masks.append([int(keep)] * len(c.token_ids))
                batch.weight_versions.append(list(c.weight_versions))
                batch.finish_reasons.append(reason)
                batch.group_ids.append(g)
                batch.texts.append(c.text)
        return batch


def sequence_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """A trainer's per-token logprobs aligned like ``PaddedRollout.logprobs``: column ``t`` holds
    ``log p(input_ids[:, t] | input_ids[:, :t])`` under ``softmax(logits / temperature)``; column 0 is 0.
    Works for HF causal LMs (``model(input_ids, attention_mask=...).logits``); keeps the graph for
    backward. Rows must be right-padded (positions then start at 0 for every row)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    if temperature != 1.0:
        logits = logits / temperature
    logp = torch.log_softmax(logits, dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return torch.nn.functional.pad(logp, (1, 0))


def check_prompt_ids(prompt_ids: Any) -> list[list[int]]:
    """Validate a batch of token-id prompts at the edge (a list of non-empty lists of ints)."""
    if not isinstance(prompt_ids, Sequence) or isinstance(prompt_ids, (str, bytes)):
        raise ValueError(f"prompt_ids must be a list of token-id lists, got {type(prompt_ids).__name__}")
    if not prompt_ids:
        raise ValueError("prompt_ids is empty: submit at least one prompt")
    out = []
    for i, p in enumerate(prompt_ids):
        if isinstance(p, torch.Tensor):
            p = p.tolist()
        if not isinstance(p, Sequence) or not p or not all(isinstance(t, int) and t >= 0 for t in p):
            raise ValueError(f"prompt_ids[{i}] must be a non-empty list of token ids, got {p!r}")
        out.append(list(p))
    return out


def rollout_params(params: SamplingParams | None, n: int) -> SamplingParams:
    """The sampling params a rollout runs with: ``n`` samples, processed logprobs, no detokenizing
    unless asked (RL loops want ids)."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    if params is None:
        params = SamplingParams(max_tokens=256, detokenize=False)
    return params.replace(n=n, logprobs_mode="processed")


class RolloutClient:
    """Generate rollouts and push weights to one engine (in process or in its own process).

    >>> client = RolloutClient.local("tiny", multiprocess=True, seed=0)
    >>> batch = client.generate([[1, 2, 3]], n=4, params=SamplingParams(max_tokens=8))
    >>> client.update_weights(trainer_model.named_parameters())   # -> new weight version
    """

    def __init__(self, llm: Any, *, owns_llm: bool = False, mask_truncated: bool = False) -> None:
        self.llm = llm
        self._owns = owns_llm
        self.mask_truncated = mask_truncated

    @classmethod
    def local(
        cls,
        model: str = "tiny",
        *,
        multiprocess: bool = False,
        mask_truncated: bool = False,
        **engine_kwargs: Any,
    ) -> RolloutClient:
        """Start an engine for ``model`` (HF directory or preset): in this process, or with
        ``multiprocess=True`` in its own process (weights then travel over a process group)."""
        from rollout import LLM

        return cls(
            LLM(model, multiprocess=multiprocess, **engine_kwargs),
            owns_llm=True,
            mask_truncated=mask_truncated,
        )

    @classmethod
    def from_llm(cls, llm: Any, *, mask_truncated: bool = False) -> RolloutClient:
        return cls(llm, mask_truncated=mask_truncated)

    @property
    def multiprocess(self) -> bool:
        return getattr(self.llm, "engine", None) is None

    def get_tokenizer(self) -> Any:
        return self.llm.get_tokenizer()

    def generate(
        self, prompt_ids: Sequence[Sequence[int]], n: int = 1, params: SamplingParams | None = None
    ) -> RolloutBatch:
        """``n`` samples of every prompt; rows are prompt-major. ``params.n`` and ``logprobs_mode`` are
        overridden (``n``, "processed")."""
        prompts = check_prompt_ids(prompt_ids)
        p = rollout_params(params, n)
        outputs = self.llm.generate(prompts, p, use_tqdm=False)
        return RolloutBatch.from_outputs(outputs, n, mask_truncated=self.mask_truncated)

    @property
    def weight_version(self) -> int:
        return int(self.llm.weight_version)

    def update_weights(
        self,
        weights: torch.nn.Module | Iterable[tuple[str, torch.Tensor]],
        version: int | None = None,
        pause: str = "keep",
    ) -> int:
        """Load a module's weights (HF parameter names; plain, DDP or FSDP) or ``(hf_name, tensor)``
        pairs into the engine; returns the new weight version. In process they are copied; to an
        engine process they travel over a process group / CUDA IPC that ``LLM.update_weights`` keeps
        open between calls. ``pause``: what happens to requests in flight ("keep", "wait", "abort")."""
        return int(self.llm.update_weights(weights, version=version, pause=pause))

    def update_weights_from_disk(self, path: str, version: int | None = None, pause: str = "keep") -> int:
        """Reload the engine's weights from a safetensors directory (``save_pretrained`` output)."""
        return int(self.llm.update_weights_from_disk(path, version=version, pause=pause))

    def sleep(self, level: int = 1) -> Any:
        return self.llm.sleep(level=level)

    def wake_up(self, tags: list[str] | None = None) -> Any:
        return self.llm.wake_up(tags=tags)

    def close(self) -> None:
        if self._owns:
            self.llm.shutdown()

    def __enter__(self) -> RolloutClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def __getattr__(name: str) -> Any:
    """``HTTPRolloutClient`` lives in ``http_rollout_client`` (which imports this module for
    ``RolloutBatch`` and the prompt checks); it stays importable from here, resolved on first use so
    the two modules do not import each other at load time."""
    if name == "HTTPRolloutClient":
        from rollout.integrations.http_rollout_client import HTTPRolloutClient

        return HTTPRolloutClient
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
