"""A verl-style rollout worker: ``generate_sequences`` on padded prompt tensors, ``update_weights`` from
an iterator of ``(name, tensor)``, and ``release`` / ``resume`` of device memory between phases.

It mirrors verl's rollout interface (``verl.workers.rollout.base.BaseRollout``: async ``resume(tags)``,
``update_weights(weights)``, ``release()``, and ``generate_sequences(prompts)``) without importing
verl: the input is a mapping of tensors (or any object with ``.batch`` and ``.meta_info``, such as
verl's ``DataProto``) and the output a plain ``dict`` of tensors with verl's key names:

input: ``input_ids`` [B, P] LEFT-padded prompts, ``attention_mask`` [B, P] (``position_ids`` ignored);
``meta_info``: optional ``n`` (samples per prompt), ``do_sample`` (False = greedy), ``validate``.

output (``B * n`` rows, the n samples of a prompt adjacent, as verl's ``repeat(interleave=True)``):

- ``prompts`` [B*n, P]: the left-padded prompts, repeated
- ``responses`` [B*n, R]: completion ids right-padded with ``pad_token_id`` to ``response_length``
- ``response_mask`` [B*n, R]: 1 on generated tokens (the EOS that ended a sample included)
- ``input_ids`` [B*n, P+R], ``attention_mask`` [B*n, P+R], ``position_ids`` [B*n, P+R]
- ``rollout_log_probs`` [B*n, R]: the engine's processed logprob of each response token, 0 on padding
- ``weight_versions`` [B*n]: the oldest weight version behind each response
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from rollout.integrations.rollout_client import RolloutClient
from rollout.samplers.params import SamplingParams


class RolloutWorker:
    """The rollout half of a verl-style actor/rollout worker, over a ``RolloutClient``."""

    def __init__(
        self,
        client: RolloutClient,
        *,
        response_length: int,
        pad_token_id: int,
        n: int = 1,
        params: SamplingParams | None = None,
    ) -> None:
        """``response_length``: the fixed width of ``responses`` and the ``max_tokens`` of every
        request, as in verl's rollouts. ``params``: the other sampling settings (their ``max_tokens``
        is replaced: SamplingParams' default of 16 silently capped responses at 16 tokens)."""
        if not isinstance(response_length, int) or response_length < 1:
            raise ValueError(f"response_length must be an int >= 1, got {response_length!r}")
        self.client = client
        self.response_length = response_length
        self.pad_token_id = int(pad_token_id)
        self.n = n
        base = params or SamplingParams(max_tokens=response_length, detokenize=False)
        self.params = base.replace(max_tokens=response_length)

    # ---- generation ---------------------------------------------------------------------------
    def generate_sequences(self, prompts: Any) -> dict[str, torch.Tensor]:
        """Generate for a batch of left-padded prompts (see the module docstring for the fields)."""
        batch, meta = _unpack(prompts)
        input_ids, mask = batch["input_ids"], batch.get("attention_mask")
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, prompt_len], got shape {tuple(input_ids.shape)}")
        if mask is None:
            mask = (input_ids != self.pad_token_id).long()
        n = int(meta.get("n", self.n))
        params = self.params
        if meta.get("do_sample", True) is False:  # verl's validation switch: greedy, one sample
            params = params.replace(temperature=0.0)
            n = 1
        prompt_ids = [row[m.bool()].tolist() for row, m in zip(input_ids.cpu(), mask.cpu(), strict=True)]
        out = self.client.generate(prompt_ids, n=n, params=params)

        rows, P, R = len(out), input_ids.shape[1], self.response_length
        responses = torch.full((rows, R), self.pad_token_id, dtype=torch.long)
        response_mask = torch.zeros((rows, R), dtype=torch.long)
        logprobs = torch.zeros((rows, R), dtype=torch.float32)
        for r, (ids, lps, lm) in enumerate(
            zip(out.completion_ids, out.logprobs, out.loss_masks, strict=True)
        ):
            k = len(ids)
            responses[r, :k] = torch.tensor(ids, dtype=torch.long)
            response_mask[r, :k] = torch.tensor(lm, dtype=torch.long)
            logprobs[r, :k] = torch.tensor(lps, dtype=torch.float32)
        prompts_rep = input_ids.cpu().repeat_interleave(n, dim=0)
        prompt_mask = mask.cpu().long().repeat_interleave(n, dim=0)
        gen_mask = (
            torch.arange(R)[None, :] < torch.tensor([len(c) for c in out.completion_ids])[:, None]
        ).long()
        attention_mask = torch.cat([prompt_mask, gen_mask], dim=1)
        # Positions count real tokens only: left padding gets 0, responses continue the prompt.
        position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
        tail = position_ids[:, P - 1 : P] + torch.arange(1, R + 1)[None, :]
        position_ids = torch.cat([position_ids[:, :P], tail], dim=1)
        versions = torch.tensor([min(v) if v else -1 for v in out.weight_versions], dtype=torch.long)
        device = input_ids.device
        result = {
            "prompts": prompts_rep,
            "responses": responses,
            "response_mask": response_mask,
            "input_ids": torch.cat([prompts_rep, responses], dim=1),
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "rollout_log_probs": logprobs,
            "weight_versions": versions,
        }
        return {k: v.to(device) for k, v in result.items()}

    # ---- weights and memory (sync forms; the async ones below match verl's BaseRollout) -----------
    def update_weights_sync(
        self, weights: Iterable[tuple[str, torch.Tensor]], version: int | None = None
    ) -> int:
        """Load ``(hf_name, tensor)`` pairs (a generator is fine) into the engine; new weight version."""
        return self.client.update_weights(weights, version=version)

    def release_memory(self, level: int = 1) -> Any:
        """Free the engine's KV cache and weights memory (training phase of a colocated worker)."""
        return self.client.sleep(level=level)

    def resume_memory(self, tags: list[str] | None = None) -> Any:
        """Restore ``tags`` ("weights", "kv_cache"; both by default) before the next rollout phase."""
        return self.client.wake_up(tags=tags)

    async def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]], **kwargs: Any) -> int:
        return await asyncio.to_thread(self.update_weights_sync, weights, kwargs.get("version"))

    async def release(self) -> Any:
        return await asyncio.to_thread(self.release_memory)

    async def resume(self, tags: list[str]) -> Any:
        return await asyncio.to_thread(self.resume_memory, tags)


def _unpack(prompts: Any) -> tuple[Mapping[str, torch.Tensor], Mapping[str, Any]]:
    if isinstance(prompts, Mapping):
        return prompts, prompts.get("meta_info", {}) if isinstance(prompts.get("meta_info"), Mapping) else {}
    batch = getattr(prompts, "batch", None)
    if batch is None:
        raise TypeError(
            f"prompts must be a mapping of tensors or a DataProto-like object, got {type(prompts).__name__}"
        )
    return batch, getattr(prompts, "meta_info", None) or {}
