"""The fused sampling kernel (rollout.kernels.sampling) against the torch sampler.

Without CUDA the kernels run in Triton's CPU interpreter on small shapes: Triton reads
TRITON_INTERPRET when ``@triton.jit`` decorates a function, so it is set before the kernel module's
first import (tests/kernels/conftest.py may have set it already; either way works). With CUDA the
same tests run compiled on the GPU, plus the ``gpu`` tests at the real shape (B=256, V=151936, bf16).
"""

from __future__ import annotations

import importlib
import inspect
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from rollout.kernels import sampling as ks  # noqa: E402
from rollout.samplers import RowSampling, SamplingParams, SamplingTensors, rng, sample  # noqa: E402
from rollout.samplers import sampler as sampler_module  # noqa: E402
from tests.samplers.test_sampler_no_host_sync import sync_violations  # noqa: E402

if not torch.cuda.is_available() and not ks.is_interpreted():
    ks = importlib.reload(ks)  # imported before the variable was set: decorate the kernels again

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
B, V = 5, 1000
HIGH_SEEDS = [2**64 - 1, 2**63, 0xDEADBEEFCAFEBABE, -5, 2**32 + 7, 0, 1, 2**62 + 3]
HIGH_OFFSETS = [0, 2**33 + 1, 7, 2**63 - 1, 12345, 1, 2**40, 3]
# (num_chunks, block_size): the launch heuristics, then several tiles and chunks per row.
LAUNCHES = [(None, None), (3, 64), (16, 32)]


def _rows(params: list[SamplingParams], banned: list[tuple[int, ...]] | None = None) -> list[RowSampling]:
    banned = banned or [()] * len(params)
    return [
        RowSampling(p, HIGH_SEEDS[i % 8] ^ (i // 8), (HIGH_OFFSETS[i % 8] + i // 8) % 2**63, banned[i])
        for i, p in enumerate(params)
    ]


def _logits(b: int, v: int = V, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return (torch.randn(b, v, generator=torch.Generator().manual_seed(seed)) * scale).to(DEVICE)


def _fused(logits: torch.Tensor, t: SamplingTensors, **launch: object) -> ks.FusedSampleOutput:
    return ks.fused_sample(
        logits,
        t.temperature,
        t.greedy,
        t.seeds,
        t.offsets,
        t.processed_mode,
        t.banned_rows,
        t.banned_tokens,
        all_greedy=t.all_greedy,
        any_processed=t.any_processed,
        **launch,  # type: ignore[arg-type]
    )


def _assert_same(logits: torch.Tensor, t: SamplingTensors, atol: float = 1e-5) -> None:
    """Kernel path vs torch path through ``sample``: same tokens, top-k and ranks; logprobs within atol."""
    ref = sample(logits, t, use_kernel=False)
    out = sample(logits, t, use_kernel=True)
    assert torch.equal(out.token_ids, ref.token_ids)
    torch.testing.assert_close(out.logprobs, ref.logprobs, atol=atol, rtol=0)
    if ref.topk_ids is None:
        assert out.topk_ids is None and out.topk_logprobs is None and out.ranks is None
        return
    assert torch.equal(out.ranks, ref.ranks)
    torch.testing.assert_close(out.topk_logprobs, ref.topk_logprobs, atol=atol, rtol=0)
    # topk orders ties arbitrarily (bf16 logits tie often): ids must agree where the value beats the
    # K-th one, and each id must carry its listed value.
    assert torch.equal(
        _above_kth(out.topk_ids, out.topk_logprobs), _above_kth(ref.topk_ids, ref.topk_logprobs)
    )
    if not t.any_processed:
        lp = logits.float().log_softmax(-1)
        torch.testing.assert_close(lp.gather(1, out.topk_ids), out.topk_logprobs, atol=atol, rtol=0)


def _above_kth(ids: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Each row's ids whose value beats the row's K-th (others -1), sorted: what any tie order agrees on."""
    return torch.where(values > values[:, -1:], ids, -1).sort(-1).values


def test_noise_is_the_rng_modules() -> None:
    seeds = torch.tensor([rng_seed - 2**64 if rng_seed >= 2**63 else rng_seed for rng_seed in HIGH_SEEDS])
    offsets = torch.tensor(HIGH_OFFSETS)
    seeds, offsets = seeds.to(DEVICE), offsets.to(DEVICE)
    bits, log_e = ks.race_noise(seeds, offsets, 777)
    assert torch.equal(bits, rng.random_bits(seeds, offsets, 777))
    ref = rng.log_exponential(seeds, offsets, 777)
    if ks.is_interpreted():  # Goldberg's log1p vs torch's: a few ulps
        torch.testing.assert_close(log_e, ref, rtol=1e-6, atol=1e-6)
    else:  # libdevice log1pf/logf, which torch's CUDA kernels call: bitwise
        assert torch.equal(log_e, ref)


@pytest.mark.parametrize("launch", LAUNCHES, ids=str)
@pytest.mark.parametrize("logprobs", [None, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matches_torch_sampler(launch: tuple[int | None, int | None], logprobs: int | None, dtype) -> None:
    temps = [1.0, 0.7, 0.0, 1.3, 0.05, 1.0, 2.0, 0.0]
    params = [
        SamplingParams(
            temperature=temps[i], logprobs=logprobs, logprobs_mode=("raw", "processed")[i % 2 == 1]
        )
        for i in range(8)
    ]
    banned = [(), (0, 1, 999), (3,), (), (500, 5, 500), (), (17,), ()]
    t = SamplingTensors.build(_rows(params, banned), V, DEVICE)
    logits = _logits(8).to(dtype)
    num_chunks, block = launch
    out = _fused(logits, t, num_chunks=num_chunks, block_size=block, write_source=True)
    ref = sample(logits, t, use_kernel=False)
    assert torch.equal(out.token_ids, ref.token_ids)
    torch.testing.assert_close(out.logprobs, ref.logprobs, atol=1e-5, rtol=0)
    # The logprob source is bit-identical to the torch path's: IEEE division by T, bans at -inf.
    processed = logits.float() / t.temperature[:, None]
    processed[t.banned_rows, t.banned_tokens] = float("-inf")
    assert torch.equal(out.source, torch.where(t.processed_mode[:, None], processed, logits.float()))
    _assert_same(logits, t)


@pytest.mark.parametrize("mode", ["raw", "processed"])
def test_many_seeds_same_tokens_as_torch(mode: str) -> None:
    # Many rows of one distribution, each its own seed: every draw must agree with the torch path.
    params = [SamplingParams(temperature=0.9, logprobs_mode=mode, logprobs=2)] * 64
    rows = [RowSampling(p, (i * 0x9E3779B97F4A7C15) % 2**64, i, ()) for i, p in enumerate(params)]
    t = SamplingTensors.build(rows, 300, DEVICE)
    _assert_same(_logits(1, 300, scale=1.0).expand(64, -1), t)


@pytest.mark.parametrize("launch", LAUNCHES, ids=str)
def test_greedy_ties_go_to_the_lowest_id(launch: tuple[int | None, int | None]) -> None:
    logits = _logits(B).round()  # integers: many exact ties, the max included
    logits[:, [40, 450, 900]] = 50.0  # one max in several tiles and chunks
    logits[1, 40] = 0.0
    logits[2, :] = 1.0  # a constant row: token 0
    rows = _rows([SamplingParams(temperature=0.0)] * B, [(), (), (), (40,), ()])
    t = SamplingTensors.build(rows, V, DEVICE)
    out = _fused(logits, t, num_chunks=launch[0], block_size=launch[1])
    assert out.token_ids.tolist() == [40, 450, 0, 450, 40]
    _assert_same(logits, t)


@pytest.mark.parametrize("launch", LAUNCHES, ids=str)
def test_race_ties_go_to_the_lowest_id(launch: tuple[int | None, int | None]) -> None:
    # At 1e10 the noise (|log E| < 25) is below half an ulp: those keys tie exactly.
    logits = _logits(B)
    logits[:, [700, 130, 555]] = 1e10
    rows = _rows([SamplingParams(temperature=1.0)] * B, [(), (130,), (130, 555), (), (130, 555, 700)])
    t = SamplingTensors.build(rows, V, DEVICE)
    out = _fused(logits, t, num_chunks=launch[0], block_size=launch[1])
    assert out.token_ids.tolist()[:4] == [130, 555, 700, 130]
    _assert_same(logits, t)


def test_banned_tokens_are_never_sampled() -> None:
    n = 100
    logits = _logits(1, 50, scale=1.0).expand(n, -1).clone()
    logits[:, 7] = 8.0  # overwhelmingly likely, and banned
    ban = (7, 0, 1, 2)
    params = [SamplingParams(temperature=1.5, logprobs_mode="processed", logprobs=4)] * n
    t = SamplingTensors.build([RowSampling(p, i, 0, ban) for i, p in enumerate(params)], 50, DEVICE)
    out = sample(logits, t, use_kernel=True)
    assert not torch.isin(out.token_ids, torch.tensor(ban, device=DEVICE)).any()
    assert not torch.isin(out.topk_ids, torch.tensor(ban, device=DEVICE)).any()
    _assert_same(logits, t)


def test_all_greedy_raw_batch_and_empty_batch() -> None:
    t = SamplingTensors.build(_rows([SamplingParams(temperature=0.0, logprobs=1)] * B), V, DEVICE)
    _assert_same(_logits(B), t)
    empty = SamplingTensors.build([], V, DEVICE)
    out = sample(torch.empty(0, V, device=DEVICE), empty, use_kernel=True)
    assert out.token_ids.shape == (0,) and out.logprobs.shape == (0,)


def test_launcher_rejects_bad_inputs() -> None:
    t = SamplingTensors.build(_rows([SamplingParams()] * B), V, DEVICE)
    logits = _logits(B)
    with pytest.raises(ValueError, match="logits"):
        _fused(logits.double(), t)
    with pytest.raises(ValueError, match="unit column stride"):
        _fused(_logits(V, B).t(), t)
    with pytest.raises(ValueError, match="temperature"):
        ks.fused_sample(
            logits, t.temperature[:2], t.greedy, t.seeds, t.offsets, t.processed_mode,
            t.banned_rows, t.banned_tokens, all_greedy=False, any_processed=False,
        )  # fmt: skip
    with pytest.raises(ValueError, match="seeds"):
        ks.fused_sample(
            logits, t.temperature, t.greedy, t.seeds.int(), t.offsets, t.processed_mode,
            t.banned_rows, t.banned_tokens, all_greedy=False, any_processed=False,
        )  # fmt: skip
    with pytest.raises(ValueError, match="block_size"):
        _fused(logits, t, block_size=100)
    with pytest.raises(ValueError, match="num_chunks"):
        _fused(logits, t, num_chunks=10_000)
    filtered = SamplingTensors.build(_rows([SamplingParams(top_k=5)] * B), V, DEVICE)
    with pytest.raises(ValueError, match="top-k"):
        sample(logits, filtered, use_kernel=True)
    penalized = SamplingTensors.build(_rows([SamplingParams(presence_penalty=0.5)] * B), V, DEVICE)
    with pytest.raises(ValueError, match="penalt"):
        sample(logits, penalized, use_kernel=True)
    biased = SamplingTensors.build(_rows([SamplingParams(logit_bias={1: 2.0})] * B), V, DEVICE)
    with pytest.raises(ValueError, match="bias"):
        sample(logits, biased, use_kernel=True)


def test_dispatch_is_host_only() -> None:
    plain = SamplingTensors.build(_rows([SamplingParams()] * B), V, "cpu")
    filtered = SamplingTensors.build(_rows([SamplingParams(top_p=0.9)] * B), V, "cpu")
    assert not sampler_module._kernel_applies(torch.zeros(B, V), plain)  # CPU logits: torch path
    if torch.cuda.is_available():
        assert sampler_module._kernel_applies(torch.zeros(B, V, device="cuda"), plain)
        assert not sampler_module._kernel_applies(torch.zeros(B, V, device="cuda"), filtered)
        penalized = SamplingTensors.build(_rows([SamplingParams(repetition_penalty=1.1)] * B), V, "cuda")
        assert not sampler_module._kernel_applies(torch.zeros(B, V, device="cuda"), penalized)


def test_kernel_module_has_no_host_syncs() -> None:
    assert sync_violations(inspect.getsource(ks)) == []


# ---------------------------------------------------------------------------------- real shape (GPU)

REAL_B, REAL_V = 256, 151_936


def _real_batch(logprobs: int | None) -> tuple[torch.Tensor, SamplingTensors]:
    temps = [1.0, 0.0, 0.6, 1.0, 1.4, 0.0, 1.0, 0.8]
    params = [
        SamplingParams(
            temperature=temps[i % 8], logprobs=logprobs, logprobs_mode=("raw", "processed")[i % 3 == 0]
        )
        for i in range(REAL_B)
    ]
    banned = [(151_643, 151_645) if i % 4 == 0 else () for i in range(REAL_B)]
    t = SamplingTensors.build(_rows(params, banned), REAL_V, "cuda")
    logits = torch.randn(REAL_B, REAL_V, device="cuda", generator=torch.Generator("cuda").manual_seed(1)) * 4
    logits[::4, 151_643] = 40.0  # EOS would win where it is not banned
    return logits.to(torch.bfloat16), t


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("logprobs", [None, 5])
def test_real_shape_matches_torch(logprobs: int | None) -> None:
    logits, t = _real_batch(logprobs)
    _assert_same(logits, t)
    out = sample(logits, t)  # the default dispatch takes the kernel here
    assert torch.equal(out.token_ids, sample(logits, t, use_kernel=True).token_ids)
    assert not (out.token_ids[::4] == 151_643).any()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_real_shape_greedy_ties_and_no_host_sync() -> None:
    logits, t = _real_batch(5)
    sample(logits, t)  # compile and warm up outside the checked region
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = sample(logits, t)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    _assert_same(logits, t)
    assert out.token_ids.device.type == "cuda"
    greedy = SamplingTensors.build(_rows([SamplingParams(temperature=0.0)] * REAL_B), REAL_V, "cuda")
    tied = torch.zeros(REAL_B, REAL_V, dtype=torch.bfloat16, device="cuda")
    tied[:, [5, 70_000, 151_000]] = 3.0
    tied += torch.randn_like(tied) * 0.1 * (tied == 0)  # below the max
    assert (sample(tied, greedy).token_ids == 5).all()
