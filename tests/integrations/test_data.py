"""Prompt sets from local json / jsonl / parquet files into chat-templated token-id batches."""

from __future__ import annotations

import json

import pytest

from rollout.integrations.data import encode_prompt, load_prompt_dataset, prompt_batches

datasets = pytest.importorskip("datasets")

ROWS = [
    {"prompt": "12+3=", "answer": "15"},
    {"prompt": "reverse 123", "answer": "321"},
    {"prompt": "x" * 200, "answer": "long"},
]


@pytest.fixture
def files(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    js = tmp_path / "p.json"
    js.write_text(json.dumps(ROWS))
    parquet = tmp_path / "p.parquet"
    datasets.Dataset.from_list(ROWS).to_parquet(str(parquet))
    return {"jsonl": jsonl, "json": js, "parquet": parquet}


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet"])
def test_load_and_batch_with_chat_template(files, hf_model, kind):
    _, tok = hf_model
    ds = load_prompt_dataset(str(files[kind]))
    assert len(ds) == 3 and set(ds.column_names) == {"prompt", "answer"}
    batches = list(prompt_batches(ds, tok, batch_size=2, shuffle=False, max_prompt_len=100))
    assert [len(b.prompt_ids) for b in batches] == [2]  # the 200-char prompt is skipped
    b = batches[0]
    assert b.indices == [0, 1] and [r["answer"] for r in b.rows] == ["15", "321"]
    text = "<|im_start|>user\n12+3=<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(b.prompt_ids[0]) == text
    assert b.prompt_ids[0] == tok.encode(text, add_special_tokens=False)


def test_messages_system_prompt_and_raw(hf_model):
    _, tok = hf_model
    msgs = [{"role": "user", "content": "hi"}]
    ids = encode_prompt(tok, msgs, system_prompt="be brief")
    assert tok.decode(ids).startswith("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi")
    assert encode_prompt(tok, "hi", chat=False) == [104, 105]
    with pytest.raises(ValueError, match="string or a list"):
        encode_prompt(tok, 5)


def test_shuffle_epochs_drop_last(hf_model):
    _, tok = hf_model
    rows = [{"prompt": str(i)} for i in range(5)]
    a = [b.indices for b in prompt_batches(rows, tok, 2, seed=1, epochs=2)]
    b = [b.indices for b in prompt_batches(rows, tok, 2, seed=1, epochs=2)]
    assert a == b and [len(x) for x in a] == [2, 2, 1, 2, 2, 1]
    assert sorted(sum(a[:3], [])) == list(range(5))
    assert [len(x.indices) for x in prompt_batches(rows, tok, 2, shuffle=False, drop_last=True)] == [2, 2]


def test_bad_inputs(tmp_path, hf_model):
    _, tok = hf_model
    with pytest.raises(ValueError, match="does not exist"):
        load_prompt_dataset(str(tmp_path / "nope.jsonl"))
    bad = tmp_path / "p.txt"
    bad.write_text("x")
    with pytest.raises(ValueError, match="unsupported extension"):
        load_prompt_dataset(str(bad))
    ds = datasets.Dataset.from_list([{"question": "q"}])
    with pytest.raises(ValueError, match="no column 'prompt'"):
        next(prompt_batches(ds, tok, 1))
    # empty files: a clear error (a bare StopIteration from datasets for .jsonl before)
    for name, content in (("e.jsonl", ""), ("e.csv", ""), ("e.json", "[]"), ("h.csv", "prompt\n")):
        path = tmp_path / name
        path.write_text(content)
        with pytest.raises(ValueError, match="empty|no rows|no data"):
            load_prompt_dataset(str(path))
    rows = [{"prompt": "a"}, {"prompt": "b"}]
    for kwargs in ({"batch_size": True}, {"epochs": 0}, {"epochs": 1.5}):  # True ran as 1, 0 as nothing
        args = {"batch_size": 1, **kwargs}
        with pytest.raises(ValueError, match="must be an int >= 1"):
            next(prompt_batches(rows, tok, args.pop("batch_size"), **args))
