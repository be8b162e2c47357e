"""A small, complete GRPO loop on the rollout engine: task, reward, advantages, loss, train step.

Each step: sample prompts from a self-generated verifiable task, generate ``n`` completions per prompt
on the engine (its weights equal the trainer's), score them, normalize rewards within each prompt's
group (GRPO advantages), take a clipped policy-gradient step with the engine's sampled-token
logprobs as the old logprobs, and push the new weights to the engine (a real weight sync: with
``multiprocess=True`` the engine is another process).

The task (``DigitTask``): the prompt is a few random digits and a marker, e.g. ``"381>"``; the answer
is the digits reversed (``"183"``) or copied. The reward gives partial credit per position: 1 for
the right digit, ``digit_credit`` for any digit, 0 otherwise, averaged over the answer length, so a
random model gets a signal at once and the exact-match rate follows.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from rollout.integrations.rollout_client import RolloutBatch, RolloutClient, sequence_logprobs
from rollout.samplers.params import SamplingParams

DIGITS = "0123456789"


@dataclass(frozen=True)
class DigitTask:
    """Reverse (or copy) a string of random digits; partial-credit and exact-match rewards."""

    kind: str = "reverse"  # "reverse" | "copy"
    num_digits: int = 3  # digits in a prompt = answer length
    digit_credit: float = 0.25  # reward for a digit in the wrong place (shaping for a random model)
    marker: str = ">"  # ends the prompt; the answer starts right after it

    def __post_init__(self) -> None:
        if self.kind not in ("reverse", "copy"):
            raise ValueError(f"task kind must be 'reverse' or 'copy', got {self.kind!r}")
        if not isinstance(self.num_digits, int) or self.num_digits < 1:
            raise ValueError(f"num_digits must be an int >= 1, got {self.num_digits!r}")
        if not 0.0 <= self.digit_credit < 1.0:
            raise ValueError(f"digit_credit must be in [0, 1), got {self.digit_credit!r}")

    def sample(self, rng: random.Random) -> tuple[str, str]:
        """One (prompt text, answer text) pair."""
        digits = "".join(rng.choice(DIGITS) for _ in range(self.num_digits))
        answer = digits[::-1] if self.kind == "reverse" else digits
        return digits + self.marker, answer

    def reward(self, completion: str, answer: str) -> float:
        """Mean over answer positions: 1 for the right digit, ``digit_credit`` for another digit."""
        score = 0.0
        for i, want in enumerate(answer):
            got = completion[i] if i < len(completion) else ""
            score += 1.0 if got == want else (self.digit_credit if got in DIGITS and got else 0.0)
        return score / len(answer)

    @staticmethod
    def exact(completion: str, answer: str) -> bool:
        return completion[: len(answer)] == answer


def group_advantages(rewards: torch.Tensor, n: int, eps: float = 1e-4, scale: bool = True) -> torch.Tensor:
    """GRPO advantages: each reward minus its group's mean (optionally over the group's std).
    ``rewards`` is flat, prompt-major (``n`` per prompt). A group with equal rewards gets zeros."""
    if rewards.ndim != 1 or rewards.numel() % n:
        raise ValueError(
            f"rewards must be flat with a multiple of n={n} entries, got shape {tuple(rewards.shape)}"
        )
    r = rewards.view(-1, n).double()  # float32 means of equal rewards (0.7) are off by an ulp
    adv = r - r.mean(dim=1, keepdim=True)
    if scale:
        adv = adv / (r.std(dim=1, keepdim=True, unbiased=False) + eps)
    # Exactly 0 where a group has no spread: a rounding residual over eps alone reached 7e-2.
    flat = r.amax(dim=1, keepdim=True) == r.amin(dim=1, keepdim=True)
    return adv.masked_fill(flat, 0.0).float().reshape(-1)


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    clip_eps: float = 0.2,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate (PPO/GRPO) averaged over the masked tokens of the batch. ``logprobs`` and
    ``old_logprobs``/``loss_mask`` are ``[B, T]`` aligned per token; ``advantages`` is ``[B]``.
    ``old_logprobs`` are the engine's (the distribution the tokens were sampled from), so the ratio
    also corrects for any training-inference mismatch."""
    ratio = torch.exp(logprobs - old_logprobs)
    adv = advantages[:, None]
    surrogate = torch.minimum(ratio * adv, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * adv)
    denom = loss_mask.sum().clamp(min=1.0)
    loss = -(surrogate * loss_mask).sum() / denom
    with torch.no_grad():
        clipped = ((ratio - 1).abs() > clip_eps).float()
        stats = {
            "clip_frac": float((clipped * loss_mask).sum() / denom),
            "approx_kl": float(((old_logprobs - logprobs) * loss_mask).sum() / denom),
        }
    return loss, stats


@dataclass(frozen=True)
class GRPOConfig:
    """Defaults: the `rollout demo grpo` run (tiny model, 2 CPU cores, a few minutes)."""

    model: str = "tiny"  # preset or HF directory (the trainer loads the same weights)
    steps: int = 40
    prompts_per_step: int = 16
    samples_per_prompt: int = 16  # n: GRPO group size
    lr: float = 3e-3
    temperature: float = 1.0
    clip_eps: float = 0.2
    updates_per_batch: int = 1  # optimizer steps per rollout batch (1 = on-policy)
    task: str = "reverse"
    num_digits: int = 3
    digit_credit: float = 0.25
    seed: int = 0
    multiprocess: bool = True  # engine in its own process (real weight sync across processes)
    device: str = "cpu"
    threads: int | None = 1  # CPU threads of the trainer and of the engine process (None: torch's default)


@dataclass
class StepLog:
    """What one GRPO step did (one line of the JSON log)."""

    step: int  # 0-based; rewards are of the rollouts generated before this step's update
    reward_mean: float  # mean shaped reward over all samples
    exact_match: float  # fraction of samples with the exact answer
    reward_std_in_group: float  # mean within-group std (0 = nothing to learn from)
    loss: float
    clip_frac: float
    approx_kl: float
    logprob_mismatch: float  # max |engine logprob - trainer logprob| on this batch, before the update
    weight_version: int  # engine version that generated this batch
    gen_s: float  # seconds generating
    train_s: float  # seconds in forward/backward/optimizer
    sync_s: float  # seconds pushing weights to the engine


class GRPOTrainer:
    """Owns the trainable model and optimizer; uses a ``RolloutClient`` for rollouts and weight sync."""

    def __init__(
        self, config: GRPOConfig, client: RolloutClient, model: torch.nn.Module, tokenizer: Any
    ) -> None:
        self.config = config
        self.client = client
        self.model = model
        self.tokenizer = tokenizer
        self.task = DigitTask(config.task, config.num_digits, config.digit_credit)
        self.rng = random.Random(config.seed)
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=config.lr, weight_decay=0.0, betas=(0.9, 0.99)
        )
        self.params = SamplingParams(
            temperature=config.temperature, max_tokens=config.num_digits, detokenize=False
        )
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.step_index = 0

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def score(self, batch: RolloutBatch, answers: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        texts = [self.decode(ids) for ids in batch.completion_ids]
        targets = [answers[g] for g in batch.group_ids]
        rewards = torch.tensor([self.task.reward(t, a) for t, a in zip(texts, targets, strict=True)])
        exact = torch.tensor([float(self.task.exact(t, a)) for t, a in zip(texts, targets, strict=True)])
        return rewards, exact

    def step(self) -> StepLog:
        cfg = self.config
        pairs = [self.task.sample(self.rng) for _ in range(cfg.prompts_per_step)]
        t0 = time.perf_counter()
        batch = self.client.generate([self.encode(p) for p, _ in pairs], cfg.samples_per_prompt, self.params)
        t1 = time.perf_counter()
        rewards, exact = self.score(batch, [a for _, a in pairs])
        adv = group_advantages(rewards, cfg.samples_per_prompt)
        padded = batch.padded(self.pad_id, device=cfg.device)
        self.model.train()
        mismatch, loss_value, stats = 0.0, 0.0, {"clip_frac": 0.0, "approx_kl": 0.0}
        for i in range(cfg.updates_per_batch):
            logp = sequence_logprobs(self.model, padded.input_ids, padded.attention_mask, cfg.temperature)
            if i == 0:
                diff = (logp.detach() - padded.logprobs).abs() * padded.loss_mask
                mismatch = float(diff.max())
            loss, stats = policy_loss(
                logp, padded.logprobs, adv.to(logp.device), padded.loss_mask, cfg.clip_eps
            )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optimizer.step()
            loss_value = loss.item()
        t2 = time.perf_counter()
        self.client.update_weights(self.model.named_parameters())
        t3 = time.perf_counter()
        std = rewards.view(-1, cfg.samples_per_prompt).std(dim=1, unbiased=False).mean()
        log = StepLog(
            step=self.step_index,
            reward_mean=float(rewards.mean()),
            exact_match=float(exact.mean()),
            reward_std_in_group=float(std),
            loss=loss_value,
            clip_frac=stats["clip_frac"],
            approx_kl=stats["approx_kl"],
            logprob_mismatch=mismatch,
            weight_version=batch.min_weight_version or 0,
            gen_s=t1 - t0,
            train_s=t2 - t1,
            sync_s=t3 - t2,
        )
        self.step_index += 1
        return log

    @torch.no_grad()
    def evaluate(self, num_prompts: int = 64, seed: int = 12345) -> dict[str, float]:
        """Greedy exact match and sampled reward on a fixed held-out prompt set (engine weights)."""
        rng = random.Random(seed)
        pairs = [self.task.sample(rng) for _ in range(num_prompts)]
        prompts = [self.encode(p) for p, _ in pairs]
        greedy = self.client.generate(prompts, 1, self.params.replace(temperature=0.0))
        sampled = self.client.generate(prompts, 4, self.params.replace(seed=seed))
        g_rewards, g_exact = self.score(greedy, [a for _, a in pairs])
        s_rewards, s_exact = self.score(sampled, [a for _, a in pairs])
        return {
            "greedy_reward": float(g_rewards.mean()),
            "greedy_exact": float(g_exact.mean()),
            "sampled_reward": float(s_rewards.mean()),
            "sampled_exact": float(s_exact.mean()),
        }


def load_trainer_model(model: str, device: str = "cpu") -> tuple[torch.nn.Module, Any]:
    """The trainer's copy of ``model`` (fp32, HF transformers) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rollout.presets import resolve_model

    path, _ = resolve_model(model, "auto")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    return hf, AutoTokenizer.from_pretrained(path)


def run_grpo(
    config: GRPOConfig,
    on_step: Callable[[StepLog], None] | None = None,
    client: RolloutClient | None = None,
    engine_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train ``config.steps`` steps; returns ``{"config", "before", "after", "steps"}`` (plain data).
    The engine starts from the same checkpoint the trainer loads, so the two agree from step 0."""
    torch.manual_seed(config.seed)
    if config.threads is not None:
        # One thread each: the two processes share the cores, and oversubscribed OpenMP threads make
        # small CPU kernels (attention over a few tokens) hundreds of times slower.
        torch.set_num_threads(config.threads)
    model, tokenizer = load_trainer_model(config.model, config.device)
    own = client is None
    if client is None:
        kwargs = dict(device=config.device, dtype="float32", seed=config.seed, **(engine_kwargs or {}))
        if config.multiprocess and config.threads is not None:
            kwargs.setdefault("env", {"OMP_NUM_THREADS": str(config.threads)})
        client = RolloutClient.local(config.model, multiprocess=config.multiprocess, **kwargs)
    try:
        trainer = GRPOTrainer(config, client, model, tokenizer)
        before = trainer.evaluate()
        steps = []
        for _ in range(config.steps):
            log = trainer.step()
            steps.append(asdict(log))
            if on_step is not None:
                on_step(log)
        after = trainer.evaluate()
    finally:
        if own:
            client.close()
    return {"config": asdict(config), "before": before, "after": after, "steps": steps}
