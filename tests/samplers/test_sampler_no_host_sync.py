"""The sampler never waits for the device.

On CPU this is a static check: the sampler's source may not call anything that reads a device
value back to the host. On a GPU (marked ``gpu``) the same batch runs under
``torch.cuda.set_sync_debug_mode("error")``, which raises on any synchronizing call.
"""

from __future__ import annotations

import ast
import inspect
import textwrap

import pytest
import torch

from rollout.samplers import RowSampling, SamplingParams, SamplingTensors, prompt_logprobs, sample
from rollout.samplers import rng as rng_module
from rollout.samplers import sampler as sampler_module

# Tensor methods/functions that copy a device value to the host, or that need one to size their result.
FORBIDDEN_ATTRS = {
    "item",
    "tolist",
    "cpu",
    "numpy",
    "nonzero",
    "argwhere",
    "masked_select",
    "unique",
    "unique_consecutive",
    "multinomial",
    "synchronize",
    "repeat_interleave",
    "any",  # tensor.any()/.all() only make sense to branch on, which syncs
    "all",
    "equal",
    "allclose",
    "Generator",
}
# Builtins that force a tensor to the host when given one (a literal argument is fine).
FORBIDDEN_BUILTINS = {"bool", "int", "float", "len"}


def sync_violations(source: str) -> list[str]:
    """Calls in ``source`` that could synchronize with the device, as 'line: call' strings."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr in FORBIDDEN_ATTRS:
            found.append(f"{node.lineno}: .{func.attr}()")
        elif (
            isinstance(func, ast.Name)
            and func.id in FORBIDDEN_BUILTINS
            and not all(isinstance(a, ast.Constant) for a in node.args)
        ):
            found.append(f"{node.lineno}: {func.id}(...)")
        if isinstance(func, ast.Attribute) and func.attr == "where" and len(node.args) == 1:
            found.append(f"{node.lineno}: torch.where(cond)")  # the one-argument form is nonzero()
        if isinstance(func, ast.Attribute) and func.attr == "to":
            for arg in [*node.args, *(k.value for k in node.keywords)]:
                if isinstance(arg, ast.Constant) and arg.value == "cpu":
                    found.append(f"{node.lineno}: .to('cpu')")
    return found


@pytest.mark.parametrize("module", [sampler_module, rng_module], ids=["sampler", "rng"])
def test_sampler_source_has_no_host_syncs(module: object) -> None:
    assert sync_violations(inspect.getsource(module)) == []


def test_the_scanner_catches_syncs() -> None:
    bad = textwrap.dedent(
        """
        def f(x, t):
            a = x.max().item()
            b = x.tolist()
            if bool(x.any()):
                pass
            idx = torch.where(x > 0)
            y = x.to("cpu")
            z = torch.multinomial(x, 1, generator=g)
            n = int(x.sum())
            return float("-inf"), x.nonzero()
        """
    )
    found = sync_violations(bad)
    for call in (".item()", ".tolist()", "bool(...)", ".any()", "torch.where(cond)", ".to('cpu')"):
        assert any(call in f for f in found), (call, found)
    assert any(".multinomial()" in f for f in found) and any(".nonzero()" in f for f in found)
    assert any("int(...)" in f for f in found)
    assert not any("float(...)" in f for f in found)  # float("-inf") is a constant


def _mixed_rows(vocab: int) -> list[RowSampling]:
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.8, top_k=50, logprobs=5),
        SamplingParams(top_p=0.9, min_p=0.02, logprobs_mode="processed", logprobs=20),
        SamplingParams(temperature=1.2, top_k=5, top_p=0.5),
    ]
    return [RowSampling(params[i % 4], seed=i, offset=3 * i, banned_token_ids=(0, 1)) for i in range(16)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_sync_on_cuda_and_same_tokens_as_cpu() -> None:
    vocab = 32_000
    rows = _mixed_rows(vocab)
    logits = torch.randn(16, vocab, generator=torch.Generator().manual_seed(0)) * 3
    cpu_out = sample(logits, SamplingTensors.build(rows, vocab, "cpu"))
    t = SamplingTensors.build(rows, vocab, "cuda")
    logits_gpu = logits.to("cuda", dtype=torch.bfloat16)
    next_ids = torch.randint(0, vocab, (16,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = sample(logits_gpu, t)
        prompt_logprobs(logits_gpu, next_ids, 5)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.token_ids.device.type == "cuda"
    # Same integer hash on both devices: identical draws from identical (fp32-upcast) logits.
    gpu_fp32 = sample(logits.cuda(), t)
    assert torch.equal(gpu_fp32.token_ids.cpu(), cpu_out.token_ids)
    assert torch.allclose(gpu_fp32.logprobs.cpu(), cpu_out.logprobs, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_penalty_batches_build_and_sample_without_sync() -> None:
    # The engine builds penalty tensors every step of a penalized batch: the token history must
    # travel without making the host wait for the device.
    vocab = 32_000
    params = [SamplingParams(repetition_penalty=1.3, frequency_penalty=0.5), SamplingParams(temperature=0.0)]
    rows = [
        RowSampling(params[i % 2], seed=i, offset=4, output_token_ids=(7, 7, i), prompt_token_ids=(1, 2, 3))
        for i in range(8)
    ]
    logits = torch.randn(8, vocab, generator=torch.Generator().manual_seed(1)) * 3
    logits_gpu = logits.to("cuda")
    pending = (torch.tensor([0], device="cuda"), torch.tensor([5], device="cuda"))  # a token still on the GPU
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        t = SamplingTensors.build(rows, vocab, "cuda")
        assert t.penalties is not None
        t.penalties.add_output_tokens(*pending)
        out = sample(logits_gpu, t)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    cpu_t = SamplingTensors.build(rows, vocab, "cpu")
    assert cpu_t.penalties is not None
    cpu_t.penalties.add_output_tokens(torch.tensor([0]), torch.tensor([5]))
    assert out.token_ids.tolist() == sample(logits, cpu_t).token_ids.tolist()
