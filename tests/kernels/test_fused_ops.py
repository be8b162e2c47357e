"""Fused add+RMSNorm, q/k norm+RoPE and SiLU-and-mul kernels against their torch references (the
layers' own numerics). fp32/fp16 everywhere; bf16 on the GPU only (the interpreter truncates casts)."""

from __future__ import annotations

import pytest
import torch

from rollout.kernels.attention_ref import store_kv_ref
from rollout.kernels.fused_ops import (
    qk_norm_rope,
    qk_norm_rope_ref,
    qk_norm_rope_store,
    rms_norm,
    rms_norm_ref,
    silu_and_mul,
    silu_and_mul_ref,
)
from rollout.models.layers.rotary import RopeParameters, RotaryEmbedding

pytestmark = pytest.mark.usefixtures("triton_interpreter")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def _tol(dtype: torch.dtype) -> dict:
    # one rounding step of the dtype: summation order / rsqrt ulps may flip a last bit
    return {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3)}.get(
        dtype, dict(atol=1.6e-2, rtol=1.6e-2)
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "cols"), [(1, 64), (7, 100), (5, 1024)])
def test_rms_norm(dtype, rows, cols):
    gen = torch.Generator().manual_seed(rows * cols)
    x = torch.randn(rows, cols, generator=gen).to(dtype).to(DEVICE)
    res = torch.randn(rows, cols, generator=gen).to(dtype).to(DEVICE)
    w = (1 + 0.1 * torch.randn(cols, generator=gen)).to(dtype).to(DEVICE)
    torch.testing.assert_close(rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6), **_tol(dtype))
    out, new_res = rms_norm(x, w, 1e-6, res)
    want, want_res = rms_norm_ref(x, w, 1e-6, res)
    assert torch.equal(new_res, want_res)  # one rounding of the same sum: exact
    torch.testing.assert_close(out, want, **_tol(dtype))
    # strided input (a view of a wider buffer)
    wide = torch.randn(rows, cols + 8, generator=gen).to(dtype).to(DEVICE)[:, 4 : 4 + cols]
    torch.testing.assert_close(rms_norm(wide, w, 1e-5), rms_norm_ref(wide, w, 1e-5), **_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "norm"), [(4, 2, 16, True), (3, 1, 32, False), (16, 8, 128, True)]
)
def test_qk_norm_rope(dtype, heads, kv_heads, head_dim, norm):
    gen = torch.Generator().manual_seed(heads * head_dim)
    tokens = 9
    rope = RopeParameters(rope_type="default", theta=10000.0)
    table = RotaryEmbedding(head_dim, 64, rope).cos_sin_cache.to(dtype).to(DEVICE)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=gen).to(dtype).to(DEVICE)
    positions = torch.randint(0, 64, (tokens,), generator=gen).to(DEVICE)
    qw = kw = None
    if norm:
        qw = (1 + 0.1 * torch.randn(head_dim, generator=gen)).to(dtype).to(DEVICE)
        kw = (1 + 0.1 * torch.randn(head_dim, generator=gen)).to(dtype).to(DEVICE)
    args = (qkv, positions, table, heads, kv_heads, head_dim, qw, kw, 1e-6)
    q, k = qk_norm_rope(*args)
    q_want, k_want = qk_norm_rope_ref(*args)
    assert q.shape == (tokens, heads, head_dim) and k.shape == (tokens, kv_heads, head_dim)
    torch.testing.assert_close(q, q_want, **_tol(dtype))
    torch.testing.assert_close(k, k_want, **_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim", "norm"), [(4, 2, 16, True), (6, 3, 32, False)])
def test_qk_norm_rope_store(dtype, heads, kv_heads, head_dim, norm):
    """The storing variant: same q, and the cache gets what store_kv would put there from the
    unfused k and v; padding rows (slot -1) and every other slot stay untouched."""
    gen = torch.Generator().manual_seed(7 * heads + head_dim)
    tokens, block_size, num_blocks = 7, 4, 6
    rope = RopeParameters(rope_type="default", theta=10000.0)
    table = RotaryEmbedding(head_dim, 64, rope).cos_sin_cache.to(dtype).to(DEVICE)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=gen).to(dtype).to(DEVICE)
    positions = torch.randint(0, 64, (tokens,), generator=gen).to(DEVICE)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
    slots[[2, 5]] = -1
    slots = slots.to(DEVICE)
    qw = kw = None
    if norm:
        qw = (1 + 0.1 * torch.randn(head_dim, generator=gen)).to(dtype).to(DEVICE)
        kw = (1 + 0.1 * torch.randn(head_dim, generator=gen)).to(dtype).to(DEVICE)
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype).to(DEVICE)
    v_cache = torch.randn(shape, generator=gen).to(dtype).to(DEVICE)
    k_want, v_want = k_cache.clone(), v_cache.clone()
    q_ref, k_ref = qk_norm_rope(qkv, positions, table, heads, kv_heads, head_dim, qw, kw, 1e-6)
    v_ref = qkv[:, (heads + kv_heads) * head_dim :].reshape(tokens, kv_heads, head_dim)
    live = slots >= 0
    store_kv_ref(k_ref[live], v_ref[live], k_want, v_want, slots[live])
    q = qk_norm_rope_store(
        qkv, positions, table, heads, kv_heads, head_dim, k_cache, v_cache, slots, qw, kw, 1e-6
    )
    assert torch.equal(q, q_ref)  # the same kernel code computes q either way
    assert torch.equal(k_cache, k_want) and torch.equal(v_cache, v_want)
    k32, v32 = torch.randn_like(k_cache), torch.randn_like(v_cache)
    k32_want, v32_want = k32.clone(), v32.clone()
    store_kv_ref(k_ref[live], v_ref[live], k32_want, v32_want, slots[live])
    qk_norm_rope_store(
        qkv, positions, table, heads, kv_heads, head_dim, k32, v32, slots.int(), qw, kw, 1e-6
    )  # int32 slots: the same stores
    assert torch.equal(k32, k32_want) and torch.equal(v32, v32_want)
    for bad in (slots.bool(), slots.float(), torch.stack([slots, slots], 1)[:, 0]):
        with pytest.raises(ValueError, match="slot_mapping"):
            qk_norm_rope_store(qkv, positions, table, heads, kv_heads, head_dim, k_cache, v_cache, bad)
    with pytest.raises(ValueError, match="slot_mapping"):
        qk_norm_rope_store(qkv, positions, table, heads, kv_heads, head_dim, k_cache, v_cache, slots[:3])
    with pytest.raises(ValueError, match="cache"):
        qk_norm_rope_store(
            qkv, positions, table, heads, kv_heads, head_dim, k_cache[:, :, :1], v_cache[:, :, :1], slots
        )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "d"), [(1, 48), (6, 300), (3, 3072)])
def test_silu_and_mul(dtype, rows, d):
    gen = torch.Generator().manual_seed(rows + d)
    x = (2 * torch.randn(rows, 2 * d, generator=gen)).to(dtype).to(DEVICE)
    torch.testing.assert_close(silu_and_mul(x), silu_and_mul_ref(x), **_tol(dtype))


def test_launchers_check_shapes():
    x = torch.randn(4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.ones(7, device=DEVICE), 1e-6)
    with pytest.raises(ValueError, match="residual"):
        rms_norm(x, torch.ones(8, device=DEVICE), 1e-6, torch.randn(4, 9, device=DEVICE))
    with pytest.raises(ValueError, match="2d"):
        silu_and_mul(torch.randn(4, 7, device=DEVICE))
    with pytest.raises(ValueError, match="narrow"):
        qk_norm_rope(
            x, torch.zeros(4, dtype=torch.long, device=DEVICE), torch.randn(8, 4, device=DEVICE), 2, 1, 4
        )


def test_fused_model_generates_the_same_tokens():
    """The tiny model (fp32, torch attention) with every fused op on gives the unfused tokens and logprobs."""
    from rollout import LLM, CacheConfig, RunnerConfig, SamplingParams

    llm = LLM(
        "tiny",
        device=DEVICE,
        dtype="float32",
        cache_config=CacheConfig(num_blocks=64),
        runner_config=RunnerConfig(attention_backend="torch", cuda_graphs=False),
    )
    modules = [m for m in llm.engine.runner.model.modules() if hasattr(m, "fused")]
    assert len(modules) > 3
    prompts = [[5, 6, 7, 8, 9, 10, 11], [42, 43, 44]]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    want = llm.generate(prompts, params, use_tqdm=False)
    for m in modules:
        m.fused = True
    got = llm.generate(prompts, params, use_tqdm=False)
    for a, b in zip(want, got, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        torch.testing.assert_close(
            torch.tensor(a.outputs[0].logprobs), torch.tensor(b.outputs[0].logprobs), atol=1e-4, rtol=0
        )


def test_triton_backend_with_fused_kv_store_generates_the_same_tokens():
    """The tiny model on the triton attention backend with the fused ops on (q/k norm + RoPE also
    stores K/V: no store_kv launch) gives the torch path's greedy tokens and logprobs. An 8-token
    step budget chunks the prompts, so steps mix decode rows (leading: decode kernel) with prompt
    chunks (extend kernel)."""
    from rollout import LLM, CacheConfig, RunnerConfig, SamplingParams, SchedulerConfig

    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [42, 43, 44], list(range(60, 72))]
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, logprobs=2)
    outs = {}
    for backend in ("torch", "triton"):
        llm = LLM(
            "tiny",
            device=DEVICE,
            dtype="float32",
            cache_config=CacheConfig(block_size=4, num_blocks=32),
            runner_config=RunnerConfig(attention_backend=backend, cuda_graphs=False),
            scheduler_config=SchedulerConfig(max_num_batched_tokens=8),
        )
        fused = [m.fused for m in llm.engine.runner.model.modules() if hasattr(m, "fused")]
        assert all(fused) == (backend == "triton")
        outs[backend] = llm.generate(prompts, params, use_tqdm=False)
        assert llm.stats().num_free_blocks == 32
    for a, b in zip(outs["torch"], outs["triton"], strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        torch.testing.assert_close(
            torch.tensor(a.outputs[0].logprobs), torch.tensor(b.outputs[0].logprobs), atol=1e-4, rtol=0
        )
