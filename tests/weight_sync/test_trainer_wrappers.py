"""What a trainer wraps its model in, pushed with ``WeightSender`` after a training step: a model
prepared by ``accelerate`` (plain, ``torch.compile``d through its dynamo plugin, bf16 autocast) and an
FSDP1 model (``FullyShardedDataParallel``) sharded over two gloo ranks in real processes (only rank 0
sends; rank 1 joins the gather). Each time the engine computes what a fresh engine loaded from the
trained weights computes."""

from __future__ import annotations

import os

import pytest
import torch

from rollout import LLM, CacheConfig
from rollout.weight_sync import WeightSender
from tests.weight_sync.helpers import (  # noqa: F401
    GREEDY,
    PROMPTS,
    assert_same,
    checkpoints,
    fingerprint,
    two_ranks,
)

CACHE = CacheConfig(num_blocks=64)
BATCH = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79], [2, 71, 82, 81, 82, 84, 59, 4]])


def make(path: str) -> LLM:
    return LLM(path, device="cpu", cache_config=CACHE)


def engine_fingerprint(path: str):
    with make(path) as llm:
        return fingerprint(llm.generate(PROMPTS, GREEDY, use_tqdm=False))


def sgd_step(model: torch.nn.Module, lr: float, backward=None) -> None:
    """One plain SGD step on a next-token loss over ``BATCH`` (the same on every rank)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loss = model(input_ids=BATCH, labels=BATCH).loss
    (backward or torch.Tensor.backward)(loss)
    opt.step()


# ---- accelerate ---------------------------------------------------------------------------------
@pytest.fixture
def fresh_accelerate_state():
    """``accelerate`` keeps one process-wide state; each test builds its own."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize(
    "options",
    [{}, {"dynamo_backend": "eager"}, {"mixed_precision": "bf16"}],
    ids=["plain", "compiled", "bf16_autocast"],
)
def test_accelerate_prepared_model(checkpoints, tmp_path, fresh_accelerate_state, options):  # noqa: F811
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    accelerator = Accelerator(cpu=True, **options)
    hf = AutoModelForCausalLM.from_pretrained(checkpoints["new_dir"], dtype=torch.float32)
    model = accelerator.prepare(hf)
    if options.get("dynamo_backend"):
        assert model is not hf and model._orig_mod is hf  # compiled: the wrapper's names carry _orig_mod.
    sgd_step(model, lr=0.5, backward=accelerator.backward)
    hf.save_pretrained(tmp_path)  # the trained weights, saved from the module accelerate wrapped
    expected = engine_fingerprint(str(tmp_path))
    assert expected != engine_fingerprint(checkpoints["new_dir"])  # the step moved the weights
    with make(checkpoints["old"]) as llm:
        sender = WeightSender(llm)
        assert sender.push(model, version=4) == 4 and sender.last_transport == "direct"
        assert_same(fingerprint(llm.generate(PROMPTS, GREEDY, use_tqdm=False)), expected)


# ---- FSDP1 over two ranks --------------------------------------------------------------------------
FSDP1_WRAPS = {  # name -> (wrap the root too, use_orig_params, SGD learning rate)
    "root_and_layers": (True, False, 0.3),
    "layers_only": (False, False, 0.5),  # the root is a plain module holding FSDP children
    "use_orig_params": (True, True, 0.7),
}


def _fsdp1_rank(rank: int, port: int, old: str, new: str, out_dir: str, results) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    llm = make(old) if rank == 0 else None
    try:
        sender = WeightSender(llm)
        for version, (name, (wrap_root, orig_params, lr)) in enumerate(FSDP1_WRAPS.items(), start=1):
            model = AutoModelForCausalLM.from_pretrained(new, dtype=torch.float32)
            if rank == 0:  # the reference: the same step on an unsharded copy (identical batch on both ranks)
                plain = AutoModelForCausalLM.from_pretrained(new, dtype=torch.float32)
                sgd_step(plain, lr)
                plain.save_pretrained(os.path.join(out_dir, name))
            layer = type(model.model.layers[0])
            kw = dict(device_id=torch.device("cpu"), use_orig_params=orig_params)
            if wrap_root:
                wrapped = FSDP(model, auto_wrap_policy=ModuleWrapPolicy({layer}), **kw)
            else:
                for i, block in enumerate(model.model.layers):
                    model.model.layers[i] = FSDP(block, **kw)
                wrapped = model
            sharded = [n for n, _ in wrapped.named_parameters() if "flat_param" in n or "_fsdp" in n]
            assert sharded, "FSDP1 did not wrap anything"
            sgd_step(wrapped, lr)
            got = sender.push(wrapped, version=10 + version)
            if llm is not None:
                outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
                results.put((name, got, sender.last_transport, fingerprint(outs)))
            else:
                assert got is None
        dist.barrier()
    except BaseException as e:
        results.put((f"rank {rank} failed", repr(e), None, None))
        raise
    finally:
        if llm is not None:
            llm.shutdown()
        dist.destroy_process_group()


def test_fsdp1_trainer_gathers_on_every_rank_and_rank0_sends(checkpoints, tmp_path):  # noqa: F811
    got = {}
    with two_ranks(_fsdp1_rank, checkpoints["old"], checkpoints["new_dir"], str(tmp_path)) as results:
        for _ in FSDP1_WRAPS:
            name, version, transport, prints = results.get(timeout=180)
            assert name in FSDP1_WRAPS, (name, version)
            got[name] = (version, transport, prints)
    first = engine_fingerprint(checkpoints["new_dir"])
    for i, name in enumerate(FSDP1_WRAPS, start=1):
        version, transport, prints = got[name]
        assert version == 10 + i and transport == "direct"
        expected = engine_fingerprint(str(tmp_path / name))
        assert expected != first
        assert_same(prints, expected)
