"""GRPO pieces (task, reward, advantages, clipped loss) and a short real run whose reward must rise."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch

from rollout.integrations.grpo import DigitTask, GRPOConfig, group_advantages, policy_loss


def test_task_and_reward():
    task = DigitTask("reverse", 3)
    prompt, answer = task.sample(random.Random(0))
    assert prompt[:3][::-1] == answer and prompt.endswith(">") and answer.isdigit()
    assert task.reward(answer, answer) == 1.0
    assert task.reward(answer + "junk", answer) == 1.0  # only the answer positions count
    assert task.reward("", answer) == 0.0
    assert task.reward("xyz", "123") == 0.0
    assert task.reward("1x9", "123") == pytest.approx((1.0 + 0.0 + 0.25) / 3)
    assert task.exact("123", "123") and not task.exact("12", "123")
    copy = DigitTask("copy", 2)
    p, a = copy.sample(random.Random(1))
    assert p == a + ">"
    with pytest.raises(ValueError):
        DigitTask("sort", 3)


def test_group_advantages():
    r = torch.tensor([1.0, 0.0, 0.5, 0.5, 2.0, 2.0, 2.0, 2.0])
    adv = group_advantages(r, n=4)
    assert adv[4:].abs().max() == 0  # a group with one reward teaches nothing
    torch.testing.assert_close(adv[:4].mean(), torch.tensor(0.0))
    assert adv[0] > adv[2] == adv[3] > adv[1]
    torch.testing.assert_close(adv[:4].std(unbiased=False), torch.tensor(1.0), atol=1e-3, rtol=0)
    with pytest.raises(ValueError):
        group_advantages(r, n=3)
    # equal rewards whose float32 mean is off by an ulp (0.7, a DigitTask 1.25/3): exactly zero, not
    # the rounding residual over eps (up to 7e-2, the same sign for the whole group)
    for value, n in ((0.7, 16), (100.7, 8), (1.25 / 3, 4)):
        assert group_advantages(torch.full((n,), value), n).abs().max() == 0, value
        assert group_advantages(torch.full((n,), value, dtype=torch.float64), n).abs().max() == 0


def test_policy_loss_gradient_and_clipping():
    old = torch.log(torch.tensor([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]))
    new = old.clone().requires_grad_(True)
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[0.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
    loss, stats = policy_loss(new, old, adv, mask)
    loss.backward()
    # on-policy: loss = -mean(A) over the 3 masked tokens; d/dlogp = -A / 3 on masked tokens, 0 elsewhere
    torch.testing.assert_close(loss, torch.tensor(-1.0 / 3))
    torch.testing.assert_close(new.grad, torch.tensor([[0.0, -1 / 3, -1 / 3], [0.0, 1 / 3, 0.0]]))
    assert stats["clip_frac"] == 0.0
    # a ratio beyond 1 + eps with a positive advantage gets no more push
    far = (old + 1.0).requires_grad_(True)
    loss, stats = policy_loss(far, old, torch.tensor([1.0, 1.0]), mask, clip_eps=0.2)
    loss.backward()
    assert far.grad.abs().max() == 0 and stats["clip_frac"] == 1.0


def test_short_grpo_run_reward_rises(tmp_path):
    """A real run: engine in its own process, weights synced over a process group after every step;
    the engine's logprobs match the trainer's at every step; the mean reward rises clearly."""
    from rollout.integrations.demo import run

    out = tmp_path / "demo"
    steps = 14
    assert run(["--steps", str(steps), "--out", str(out), "--prompts-per-step", "8"]) == 0
    log = json.loads((out / "grpo_log.json").read_text())
    assert os.path.getsize(out / "reward_curve.png") > 1000
    rewards = [s["reward_mean"] for s in log["steps"]]
    assert len(rewards) == steps
    assert [s["weight_version"] for s in log["steps"]] == list(range(steps))  # one sync per step
    assert max(s["logprob_mismatch"] for s in log["steps"]) < 1e-4
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 0.1, rewards
    assert log["after"]["greedy_reward"] > log["before"]["greedy_reward"] + 0.1


def test_config_defaults_are_the_demo():
    cfg = GRPOConfig()
    assert cfg.model == "tiny" and cfg.multiprocess and cfg.device == "cpu"
