"""TRL: a ``rollout_func`` for ``trl.GRPOTrainer`` backed by a ``RolloutClient``.

    from trl import GRPOConfig, GRPOTrainer
    from rollout.integrations import RolloutClient
    from rollout.integrations.trl import make_rollout_func

    client = RolloutClient.local(model_dir, multiprocess=True)
    trainer = GRPOTrainer(model=model_dir, reward_funcs=..., args=GRPOConfig(...), train_dataset=ds,
                          rollout_func=make_rollout_func(client))

The contract (TRL >= 0.24; checked against TRL 1.16's ``GRPOTrainer._generate``): ``rollout_func(prompts,
trainer)`` gets this process's prompts (each repeated ``num_generations`` times in a row by TRL's
sampler; strings or chat-message lists) and returns a dict with, per completion (one per entry of
``prompts``, in order): ``prompt_ids`` (list[int]), ``completion_ids`` (list[int]) and ``logprobs``
(list[float], one per completion token: the sampled token's logprob under the distribution it was
drawn from). Other keys go to the reward functions as keyword arguments; ``env_mask`` (1 = train on
the token) is TRL's per-token loss mask, sent only when some token must be masked.

Weight sync: before generating, when ``trainer.state.global_step`` moved since the last sync (i.e.
after every optimizer step) and on the first call, the trainer's model weights are pushed to the
engine through ``client.update_weights`` (gathered from DDP/FSDP wrappers by the weight sender).
PEFT adapters must be merged by the caller (``sync_model`` hook) - the engine loads full weights.
TRL is not a dependency of rollout-engine; nothing here imports it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from rollout.integrations.data import encode_prompt
from rollout.integrations.rollout_client import RolloutBatch, RolloutClient
from rollout.samplers.params import SamplingParams

REQUIRED_KEYS = ("prompt_ids", "completion_ids", "logprobs")


def sampling_params_from_trainer(trainer: Any) -> SamplingParams:
    """The engine sampling params matching a GRPOTrainer's generation settings."""
    args = trainer.args
    top_k = getattr(args, "top_k", None)
    return SamplingParams(
        temperature=float(getattr(args, "temperature", 1.0)),
        top_p=float(getattr(args, "top_p", 1.0) or 1.0),
        top_k=-1 if not top_k else int(top_k),
        min_p=float(getattr(args, "min_p", None) or 0.0),
        repetition_penalty=float(getattr(args, "repetition_penalty", None) or 1.0),
        max_tokens=int(getattr(args, "max_completion_length", 256) or 256),
        detokenize=False,
    )


def _groups(prompt_ids: list[list[int]], group: int) -> int:
    """``group`` if the prompts come in runs of ``group`` equal ones (TRL's sampler), else 1."""
    if (
        group > 1
        and len(prompt_ids) % group == 0
        and all(prompt_ids[i] == prompt_ids[i - i % group] for i in range(len(prompt_ids)))
    ):
        return group
    return 1


def to_trl_outputs(batch: RolloutBatch, extra_fields: bool = True) -> dict[str, Any]:
    """A ``RolloutBatch`` as the dict TRL's ``rollout_func`` returns (one entry per completion)."""
    out: dict[str, Any] = {
        "prompt_ids": [list(p) for p in batch.prompt_ids],
        "completion_ids": [list(c) for c in batch.completion_ids],
        "logprobs": [list(lp) for lp in batch.logprobs],
    }
    if any(0 in m for m in batch.loss_masks):
        out["env_mask"] = [list(m) for m in batch.loss_masks]
    if extra_fields:
        out["finish_reason"] = list(batch.finish_reasons)
        out["weight_version"] = [min(v) if v else -1 for v in batch.weight_versions]
    return out


def make_rollout_func(
    client: RolloutClient,
    params: SamplingParams | None = None,
    *,
    sync_weights: bool = True,
    sync_model: Callable[[Any], Any] | None = None,
    system_prompt: str | None = None,
    chat: bool | None = None,
    extra_fields: bool = True,
) -> Callable[[list[Any], Any], dict[str, Any]]:
    """A ``rollout_func`` for ``trl.GRPOTrainer``.

    ``params``: engine sampling params (default: from the trainer's args, see
    ``sampling_params_from_trainer``). ``sync_model(trainer)`` returns what to push (default: the
    trainer's unwrapped model). ``chat``: None (default, as TRL does) renders chat-message prompts with
    the tokenizer's chat template (with the trainer's ``chat_template_kwargs``, ``chat_template`` and
    ``tools``) and encodes string prompts as they are, special tokens (BOS) included; True templates
    strings too (as one user message); False never templates (and adds no special tokens)."""
    state = {"synced_step": None}

    def rollout_func(prompts: list[Any], trainer: Any) -> dict[str, Any]:
        if sync_weights:
            step = trainer.state.global_step
            if state["synced_step"] != step:
                if sync_model is not None:
                    model = sync_model(trainer)
                else:
                    model = trainer.accelerator.unwrap_model(trainer.model)
                client.update_weights(model)
                state["synced_step"] = step
        tokenizer = getattr(trainer.processing_class, "tokenizer", trainer.processing_class)
        template = _template_kwargs(trainer)
        ids = [
            encode_prompt(
                tokenizer,
                p,
                system_prompt=system_prompt,
                chat=not isinstance(p, str) if chat is None else chat,
                template_kwargs=template,
                special_tokens=chat is None,  # TRL encodes untemplated strings with BOS
            )
            for p in prompts
        ]
        training = getattr(trainer.model, "training", True)
        group = trainer.num_generations if training else trainer.num_generations_eval
        n = _groups(ids, int(group or 1))
        p = params if params is not None else sampling_params_from_trainer(trainer)
        batch = client.generate(ids[::n], n=n, params=p)
        return to_trl_outputs(batch, extra_fields)

    return rollout_func


def _template_kwargs(trainer: Any) -> dict[str, Any]:
    """What GRPOTrainer passes to ``apply_chat_template`` besides the messages: its
    ``chat_template_kwargs`` (e.g. ``enable_thinking``), ``chat_template`` and ``tools``."""
    kwargs = dict(getattr(trainer, "chat_template_kwargs", None) or {})
    if getattr(trainer, "chat_template", None):
        kwargs["chat_template"] = trainer.chat_template
    if getattr(trainer, "tools", None):
        kwargs["tools"] = trainer.tools
    return kwargs


def check_trl_outputs(out: dict[str, Any], num_prompts: int | None = None) -> None:
    """Raise ``ValueError`` unless ``out`` meets the rollout_func contract (what TRL reads)."""
    missing = [k for k in REQUIRED_KEYS if k not in out]
    if missing:
        raise ValueError(f"rollout_func output lacks {missing}")
    p, c, lp = out["prompt_ids"], out["completion_ids"], out["logprobs"]
    if not (len(p) == len(c) == len(lp)):
        raise ValueError(f"rollout_func fields differ in length: {len(p)}, {len(c)}, {len(lp)}")
    if num_prompts is not None and len(c) != num_prompts:
        raise ValueError(f"expected {num_prompts} completions (one per prompt entry), got {len(c)}")
    for i, (ids, lps) in enumerate(zip(c, lp, strict=True)):
        if not isinstance(ids, Sequence) or not all(isinstance(t, int) for t in ids):
            raise ValueError(f"completion_ids[{i}] must be a list of int")
        if len(ids) != len(lps) or not all(isinstance(x, float) for x in lps):
            raise ValueError(f"logprobs[{i}] must be one float per completion token")
    if "env_mask" in out and [len(m) for m in out["env_mask"]] != [len(ids) for ids in c]:
        raise ValueError("env_mask must have one entry per completion token")
