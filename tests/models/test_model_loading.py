"""Checkpoint loading: sharded files, in-place copies, validate-before-write, errors, dummy weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rollout.models import ModelConfig, load_model
from rollout.models.loader import read_weight_specs, safetensors_files
from rollout.models.weights import write_weights
from tests.models.paged_kv import prefill_logits
from tests.models.tiny_models import hf_logits, random_seqs, save_tiny_checkpoint, tiny_config, tiny_hf_model

Q_PROJ = "model.layers.0.self_attn.q_proj.weight"
K_PROJ_1 = "model.layers.1.self_attn.k_proj.weight"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("qwen3")
    save_tiny_checkpoint(path, "qwen3")
    return path


@pytest.fixture
def model(checkpoint):
    return load_model(ModelConfig.from_pretrained(checkpoint, device="cpu"), "cpu")


def rewrite_checkpoint(src: Path, dst: Path, edit) -> Path:
    """Copy ``src`` to ``dst`` with ``edit(tensors)`` applied to its (single-file) weights."""
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_unchanged(model, before: dict[str, torch.Tensor]) -> None:
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), name


def test_sharded_checkpoint_matches_hf(tmp_path):
    hf = save_tiny_checkpoint(tmp_path, "llama", seed=3)
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    (tmp_path / "model.safetensors").unlink(missing_ok=True)
    files = safetensors_files(tmp_path)
    assert len(files) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    model = load_model(ModelConfig.from_pretrained(tmp_path, device="cpu"), "cpu")
    seqs = random_seqs([5, 17, 33], seed=3)
    ours = prefill_logits(model, seqs, block_size=4, num_blocks=64)
    torch.testing.assert_close(ours, torch.cat(hf_logits(hf, seqs)), atol=1e-5, rtol=1e-5)


def test_missing_shard_is_reported(tmp_path):
    hf = save_tiny_checkpoint(tmp_path, "llama")
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[-1]
    (tmp_path / victim).unlink()
    with pytest.raises(FileNotFoundError, match=victim):
        load_model(ModelConfig.from_pretrained(tmp_path, device="cpu"), "cpu")


def test_bad_index_or_shard_files_are_value_errors(tmp_path):
    """An index without a weight_map (KeyError), one naming a tensor no shard holds (accepted
    silently), a tensor in two shards, and a truncated shard (safetensors' own error type) are
    ValueErrors naming the problem, from headers only."""
    hf = save_tiny_checkpoint(tmp_path, "llama")
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    (tmp_path / "model.safetensors").unlink(missing_ok=True)
    index_path = tmp_path / "model.safetensors.index.json"
    good = index_path.read_text()
    index = json.loads(good)
    shard = sorted(set(index["weight_map"].values()))[0]
    edits = [
        ({"metadata": {}}, "no 'weight_map'"),
        ({**index, "weight_map": {**index["weight_map"], "model.layers.0.mlp.foo.weight": shard}}, "foo"),
    ]
    for edited, match in edits:
        index_path.write_text(json.dumps(edited))
        with pytest.raises(ValueError, match=match):
            read_weight_specs(safetensors_files(tmp_path))
    index_path.write_text("{not json")
    with pytest.raises(ValueError, match="not a safetensors index"):
        safetensors_files(tmp_path)
    index_path.write_text(good)
    files = safetensors_files(tmp_path)
    first = load_file(str(files[0]))
    name = next(iter(first))
    save_file({**load_file(str(files[1])), name: first[name]}, str(files[1]))  # a second copy
    with pytest.raises(ValueError, match="in both"):
        read_weight_specs(files)
    files[1].write_bytes(files[1].read_bytes()[:50])
    with pytest.raises(ValueError, match="cannot be read"):
        read_weight_specs(files)


def test_missing_directory_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ModelConfig.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        safetensors_files(tmp_path / "nope")
    tiny_config("llama", architectures=["LlamaForCausalLM"]).save_pretrained(tmp_path)
    config = ModelConfig.from_pretrained(tmp_path, device="cpu")
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_model(config, "cpu")


def test_load_weights_copies_in_place_and_casts(model, checkpoint):
    ptrs = {name: p.data_ptr() for name, p in model.named_parameters()}
    params = [p for p in model.parameters() if not p.is_meta]
    tensors = load_file(checkpoint / "model.safetensors")
    half = {name: t.to(torch.bfloat16) for name, t in tensors.items()}
    loaded = model.load_weights(half.items())
    assert loaded == set(ptrs)
    assert {name: p.data_ptr() for name, p in model.named_parameters()} == ptrs
    assert all(a is b for a, b in zip(params, model.parameters(), strict=True))  # same Parameter objects
    qkv = model.model.layers[0].self_attn.qkv_proj.weight
    assert qkv.dtype == torch.float32
    assert torch.equal(qkv[: qkv.shape[0] // 2], half[Q_PROJ].float())


def test_ignored_names(model, checkpoint):
    tensors = load_file(checkpoint / "model.safetensors")
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    model.load_weights(tensors.items())
    config = tiny_config("qwen2", tie_word_embeddings=True, architectures=["Qwen2ForCausalLM"])
    tied = load_model(ModelConfig.from_hf(config, device="cpu"), "cpu", load_format="dummy")
    weights = dict(tiny_hf_model(config).state_dict())
    weights["lm_head.weight"] = torch.zeros(300, 64)  # ignored when tied: the embedding is authoritative
    tied.load_weights(weights.items())
    assert torch.equal(tied.lm_head.weight, weights["model.embed_tokens.weight"])
    assert not torch.equal(tied.lm_head.weight, torch.zeros_like(tied.lm_head.weight))


@pytest.mark.parametrize(
    "edit, match",
    [
        (
            lambda t: t.__setitem__("model.layers.0.mlp.extra.weight", torch.zeros(2)),
            "model.layers.0.mlp.extra.weight",
        ),
        (lambda t: t.__setitem__("model.layers.0.self_attn.qkv_proj.weight", torch.zeros(2)), "qkv_proj"),
        (lambda t: t.pop(K_PROJ_1), K_PROJ_1),
        (lambda t: t.pop("model.norm.weight"), "model.norm.weight"),
        (
            lambda t: t.__setitem__(Q_PROJ, torch.zeros(64, 65)),
            Q_PROJ + ".*expected \\(64, 64\\), got \\(64, 65\\)",
        ),
        (lambda t: t.__setitem__(Q_PROJ, torch.zeros(64, 64, dtype=torch.int32)), Q_PROJ + ".*non-floating"),
    ],
    ids=["unexpected", "packed_name", "missing_shard", "missing", "shape", "dtype"],
)
def test_bad_checkpoints_raise_naming_the_tensor(checkpoint, model, tmp_path, edit, match):
    bad = rewrite_checkpoint(checkpoint, tmp_path / "bad", edit)
    config = ModelConfig.from_pretrained(bad, device="cpu")
    with pytest.raises(ValueError, match=match):
        load_model(config, "cpu")
    # The same errors from the two model-level entry points; check_weights writes nothing.
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        model.check_weights(read_weight_specs(safetensors_files(bad)))
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match=match):
        model.load_weights(load_file(bad / "model.safetensors").items())


def test_batched_write_equals_per_tensor_load_and_checks_before_copying(model, checkpoint):
    """write_weights (weight sync's bucket writes: all tensors checked, then one batched copy) lands
    the same values as load_weights (one copy per tensor), casting dtype, in the same storage; a bad
    tensor anywhere in the batch writes none of it."""
    tensors = load_file(checkpoint / "model.safetensors")
    new = {name: (t * 2 + 1).to(torch.bfloat16) for name, t in tensors.items()}
    reference = load_model(ModelConfig.from_pretrained(checkpoint, device="cpu"), "cpu")
    reference.load_weights(new.items())
    ptrs = {name: p.data_ptr() for name, p in model.named_parameters()}
    before = snapshot(model)
    bad = [*new.items()][:-1] + [(K_PROJ_1, torch.zeros(3, 3))]
    with pytest.raises(ValueError, match=K_PROJ_1):
        write_weights(model, bad)
    assert_unchanged(model, before)
    write_weights(model, new.items())
    assert {name: p.data_ptr() for name, p in model.named_parameters()} == ptrs
    for (name, got), want in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert got.dtype == torch.float32 and torch.equal(got, want), name


def test_check_weights_writes_nothing(model, checkpoint):
    before = snapshot(model)
    specs = read_weight_specs(safetensors_files(checkpoint))
    model.check_weights(specs)  # a valid set passes
    assert_unchanged(model, before)
    # Valid entries first, the bad one last: a loader would have written everything before it.
    with pytest.raises(ValueError, match=K_PROJ_1):
        model.check_weights([*specs, (K_PROJ_1, (16, 64), torch.float32)])
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match="missing weights"):
        model.check_weights([])
    assert_unchanged(model, before)


def test_dummy_weights_from_config_alone(tmp_path):
    tiny_config("mistral", sliding_window=8, architectures=["MistralForCausalLM"]).save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]
    config = ModelConfig.from_pretrained(tmp_path, device="cpu")
    model = load_model(config, "cpu", load_format="dummy", seed=7)
    assert not model.training
    assert torch.equal(model.model.norm.weight, torch.ones(64))
    assert model.model.embed_tokens.weight.abs().max() <= 0.02
    same = load_model(config, "cpu", load_format="dummy", seed=7)
    other = load_model(config, "cpu", load_format="dummy", seed=8)
    assert torch.equal(model.lm_head.weight, same.lm_head.weight)
    assert not torch.equal(model.lm_head.weight, other.lm_head.weight)
    logits = prefill_logits(model, random_seqs([3, 9]), block_size=4, num_blocks=16)
    assert logits.shape == (12, 300) and torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="load_format"):
        load_model(config, "cpu", load_format="pt")


def test_load_model_in_bfloat16(checkpoint):
    config = ModelConfig.from_pretrained(checkpoint, dtype="bfloat16", device="cpu")
    model = load_model(config, "cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.model.rotary_emb.cos_sin_cache.dtype == torch.bfloat16
    logits = prefill_logits(model, random_seqs([4, 6]), block_size=4, num_blocks=16)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()  # the sampler upcasts
    assert torch.get_default_dtype() == torch.float32  # restored after construction


def test_mistral_with_layer_types_matches_hf_per_layer(tmp_path):
    """transformers 5 reads a Mistral config with layer_types as Ministral: only the layers marked
    sliding get the window (ours put it on every layer: logits 4.6 apart)."""
    from transformers import AutoModelForCausalLM

    save_tiny_checkpoint(tmp_path, "mistral", sliding_window=8)
    config = json.loads((tmp_path / "config.json").read_text())
    config["layer_types"] = ["full_attention"] + ["sliding_attention"] * (config["num_hidden_layers"] - 1)
    (tmp_path / "config.json").write_text(json.dumps(config))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ours_config = ModelConfig.from_pretrained(tmp_path, device="cpu")
    model = load_model(ours_config, "cpu")
    assert model.spec.sliding_windows[0] is None and model.spec.sliding_windows[1] == 8
    seqs = random_seqs([5, 17, 33], seed=4)
    ours = prefill_logits(model, seqs, block_size=4, num_blocks=64)
    torch.testing.assert_close(ours, torch.cat(hf_logits(hf, seqs)), atol=1e-5, rtol=1e-5)


def test_quantized_checkpoints_are_refused(tmp_path):
    save_tiny_checkpoint(tmp_path, "llama")
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="quantized checkpoints"):
        ModelConfig.from_pretrained(tmp_path, device="cpu")
