"""The TRL rollout_func adapter: its contract against TRL's documented fields (always), and a real
``trl.GRPOTrainer`` run when TRL is installed."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from rollout import SamplingParams
from rollout.integrations.rollout_client import RolloutBatch, sequence_logprobs
from rollout.integrations.trl import (
    REQUIRED_KEYS,
    check_trl_outputs,
    make_rollout_func,
    sampling_params_from_trainer,
    to_trl_outputs,
)


def fake_trainer(model, tokenizer, G: int, max_len: int = 6) -> SimpleNamespace:
    """The attributes of trl.GRPOTrainer that a rollout_func reads."""
    args = SimpleNamespace(
        temperature=0.9, top_p=1.0, top_k=0, min_p=None, max_completion_length=max_len, repetition_penalty=1.0
    )
    return SimpleNamespace(
        state=SimpleNamespace(global_step=0),
        args=args,
        processing_class=tokenizer,
        num_generations=G,
        num_generations_eval=G,
        model=model,
        accelerator=SimpleNamespace(unwrap_model=lambda m: m),
    )


def test_rollout_func_contract_and_weight_sync(client, hf_model, perturbed):
    model, tokenizer = hf_model
    G = 3
    trainer = fake_trainer(model, tokenizer, G)
    func = make_rollout_func(client)
    texts = ["12+3=", "hello"]
    messages = [[{"role": "user", "content": "say 7"}]]
    prompts = [p for p in [*texts, *messages] for _ in range(G)]  # TRL's sampler repeats each prompt G times

    v0 = client.weight_version
    out = func(prompts, trainer)
    assert client.weight_version == v0 + 1  # the first call syncs
    check_trl_outputs(out, num_prompts=len(prompts))
    assert set(REQUIRED_KEYS) <= out.keys() and "env_mask" not in out
    assert len(out["finish_reason"]) == len(out["weight_version"]) == len(prompts)
    # string prompts are encoded as they are, message lists through the chat template (as TRL does)
    assert out["prompt_ids"][0] == list(b"12+3=") and out["prompt_ids"][G] == list(b"hello")
    rendered = tokenizer.apply_chat_template(messages[0], tokenize=False, add_generation_prompt=True)
    assert out["prompt_ids"][2 * G] == tokenizer.encode(rendered, add_special_tokens=False)
    assert all(1 <= len(c) <= 6 for c in out["completion_ids"])
    assert all(isinstance(x, float) for lp in out["logprobs"] for x in lp)

    # logprobs are the sampled tokens' under the trainer's temperature (TRL recomputes with it)
    batch = RolloutBatch(
        out["prompt_ids"],
        out["completion_ids"],
        out["logprobs"],
        [[1] * len(c) for c in out["completion_ids"]],
        [],
        [],
        [],
        1,
    )
    padded = batch.padded()
    with torch.no_grad():
        ref = sequence_logprobs(model, padded.input_ids, padded.attention_mask, temperature=0.9)
    m = padded.loss_mask.bool()
    torch.testing.assert_close(ref[m], padded.logprobs[m], atol=2e-5, rtol=0)

    func(prompts, trainer)
    assert client.weight_version == v0 + 1  # same optimizer step: no sync
    perturbed(seed=3)
    trainer.state.global_step = 1
    out = func(prompts, trainer)
    assert client.weight_version == v0 + 2  # after an optimizer step: synced
    assert set(out["weight_version"]) == {v0 + 2}


def test_unrepeated_prompts_get_one_completion_each(client, hf_model):
    model, tokenizer = hf_model
    func = make_rollout_func(client, SamplingParams(max_tokens=3), sync_weights=False)
    out = func(["a", "b", "a"], fake_trainer(model, tokenizer, G=2))  # not in runs of G: n=1 each
    check_trl_outputs(out, num_prompts=3)
    assert [p for p in out["prompt_ids"]] == [[97], [98], [97]]
    assert all(len(c) <= 3 for c in out["completion_ids"])


THINKING_TEMPLATE = (  # a Qwen3-style template that honours enable_thinking
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)


class _EchoClient:
    """Returns each prompt's ids as its completion: the test reads what the adapter encoded."""

    def generate(self, ids, n, params):
        rows = [list(p) for p in ids for _ in range(n)]
        k = len(rows)
        return RolloutBatch(
            rows, [[5]] * k, [[-1.0]] * k, [[1]] * k, [[0]] * k, ["stop"] * k, list(range(k)), n
        )


@pytest.mark.parametrize("kwargs", [{}, {"enable_thinking": False}])
def test_prompts_are_the_ids_trl_itself_makes(kwargs):
    """The adapter's prompt ids equal GRPOTrainer._tokenize_prompts' (TRL's own code, on a stand-in
    trainer): chat_template_kwargs reach the template (they were dropped) and string prompts get the
    tokenizer's BOS (they were encoded without special tokens)."""
    trl = pytest.importorskip("trl")
    from transformers import AutoTokenizer

    from rollout.presets import resolve_model

    path = resolve_model("tiny")[0]
    tok = AutoTokenizer.from_pretrained(path, bos_token="<|im_start|>", add_bos_token=True)
    tok.chat_template = THINKING_TEMPLATE
    attrs = dict(chat_template_kwargs=kwargs, chat_template=None, tools=None)
    stand_in = SimpleNamespace(processing_class=tok, _is_vlm=False, environment_factories=None, **attrs)
    trainer = fake_trainer(SimpleNamespace(training=True), tok, 1)
    trainer.__dict__.update(attrs)
    func = make_rollout_func(_EchoClient(), sync_weights=False)  # type: ignore[arg-type]
    for prompts in ([[{"role": "user", "content": "hi"}]], ["ab"]):
        want = [list(ids) for ids in trl.GRPOTrainer._tokenize_prompts(stand_in, prompts)[0]]
        assert func(prompts, trainer)["prompt_ids"] == want, prompts
    chat_ids = func([[{"role": "user", "content": "hi"}]], trainer)["prompt_ids"][0]
    assert ("<think>" in tok.decode(chat_ids)) == bool(kwargs)


def test_trainer_generation_settings_become_sampling_params():
    args = SimpleNamespace(
        temperature=0.7, top_p=0.9, top_k=20, min_p=0.05, max_completion_length=32, repetition_penalty=1.2
    )
    p = sampling_params_from_trainer(SimpleNamespace(args=args))
    assert (p.temperature, p.top_p, p.top_k, p.min_p, p.max_tokens) == (0.7, 0.9, 20, 0.05, 32)
    assert p.repetition_penalty == 1.2 and not p.detokenize
    bare = sampling_params_from_trainer(SimpleNamespace(args=SimpleNamespace()))  # TRL defaults
    assert (bare.top_k, bare.repetition_penalty, bare.max_tokens) == (-1, 1.0, 256)


def test_env_mask_marks_aborted_samples():
    batch = RolloutBatch(
        [[1], [1]],
        [[5, 6], [7]],
        [[-0.1, -0.2], [-0.3]],
        [[1, 1], [0]],
        [[0, 0], [0]],
        ["stop", "abort"],
        [0, 0],
        2,
    )
    out = to_trl_outputs(batch)
    assert out["env_mask"] == [[1, 1], [0]]
    check_trl_outputs(out)
    with pytest.raises(ValueError, match="one float per completion token"):
        check_trl_outputs({**out, "logprobs": [[-0.1], [-0.3]]})
    with pytest.raises(ValueError, match="lacks"):
        check_trl_outputs({"prompt_ids": []})


def test_real_trl_grpo_trainer(client, hf_model, tmp_path, monkeypatch):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    from rollout.presets import resolve_model

    path = resolve_model("tiny")[0]
    _, tokenizer = hf_model
    seen = []
    inner = make_rollout_func(client)

    def rollout_func(prompts, trainer):
        out = inner(prompts, trainer)
        check_trl_outputs(out, num_prompts=len(prompts))
        seen.append((trainer.state.global_step, client.weight_version))
        return out

    def reward(completions, **kwargs):
        assert "weight_version" in kwargs  # extra fields reach the reward functions
        return [float(c.count("7")) for c in completions]

    args = trl.GRPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=4,
        max_steps=2,
        learning_rate=1e-3,
        use_cpu=True,
        bf16=False,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        seed=0,
        dataloader_num_workers=0,
    )
    ds = datasets.Dataset.from_dict({"prompt": ["12>", "34>", "56>", "78>"]})
    trainer = trl.GRPOTrainer(
        model=path,
        reward_funcs=reward,
        args=args,
        train_dataset=ds,
        processing_class=tokenizer,
        rollout_func=rollout_func,
    )
    v0 = client.weight_version
    trainer.train()
    assert [step for step, _ in seen] == [0, 1]
    assert [v for _, v in seen] == [v0 + 1, v0 + 2]  # a sync before each rollout after an optimizer step
