"""The sampler: a pure function of (logits, SamplingTensors) -> tokens + logprobs, with no host sync.

Pipeline for each row, all in float32:

1. ``processed`` logits: logit bias and penalties (see ``SamplingParams``), then ``/ temperature``
   (greedy rows: temperature 1), banned tokens (min_tokens) set to -inf, then top-k, top-p and min-p
   masks (-inf outside the kept set). top-p applies to the top-k-renormalized distribution; min-p
   compares against the most likely token, which no mask ever removes. Tokens tied with the last
   kept value are kept as well, so the result does not depend on how a sort orders equal values.
2. The token: greedy rows take ``argmax(processed)`` (= argmax of the biased, penalized, banned
   logits: the masks never drop the maximum; ties go to the lowest id). Other rows run the
   exponential race ``argmax(p / E)`` = ``argmax(processed - log E)``, ``E ~ Exp(1)`` from the
   counter-based hash of ``rollout.samplers.rng``: the same (seed, offset) gives the same token in
   any batch.
3. Logprobs, per row in the row's ``logprobs_mode``:

   * ``"raw"``: ``log_softmax(logits)``, the model's own distribution with nothing applied (no
     bias, no penalties, no temperature, no bans): what a trainer recomputes for the same tokens.
     Masked or banned tokens keep their model logprob here.
   * ``"processed"``: ``log_softmax(processed)``, the distribution the token was drawn from;
     tokens outside the kept set are -inf. For greedy rows this is the filtered distribution at
     temperature 1 (the argmax is a point mass, whose log would be 0 everywhere it is defined).

   ``logprobs`` is the sampled token's logprob (always returned); ``topk_ids``/``topk_logprobs``
   are the K largest of the same distribution, sorted descending, K = min(max_num_logprobs, V);
   ``ranks`` is 1 + the number of tokens strictly more likely than the sampled one.

On CUDA, batches without top-k / top-p / min-p / penalties / logit bias go through the fused Triton kernel of
``rollout.kernels.sampling`` (one pass over the logits instead of ~20): same tokens (the same hash
bits and float32 formulas), same logprobs up to float32 summation order. ``sample(...,
use_kernel=...)`` forces either path.

No step reads a device value on the host: branches use only the host flags of SamplingTensors
and tensor shapes, so the whole function can be enqueued without waiting for the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from rollout.samplers.params import MAX_LOGPROBS
from rollout.samplers.rng import log_exponential
from rollout.samplers.tensors import PenaltyTensors, SamplingTensors

if TYPE_CHECKING:
    from rollout.kernels.sampling import FusedSampleOutput

_NEG_INF = float("-inf")


@dataclass(frozen=True, eq=False)
class SamplerOutput:
    """Device tensors for the B rows of one step, in row order (copy to the host once, together)."""

    token_ids: torch.Tensor  # [B] i64: the sampled token
    logprobs: torch.Tensor  # [B] f32: its logprob in the row's logprobs_mode
    topk_ids: torch.Tensor | None  # [B, K] i64, most likely first; None when K == 0
    topk_logprobs: torch.Tensor | None  # [B, K] f32, matching topk_ids; a row asking k < K reads k columns
    ranks: torch.Tensor | None  # [B] i64: 1 + #tokens more likely than the sampled one; None when K == 0


def sample(logits: torch.Tensor, t: SamplingTensors, *, use_kernel: bool | None = None) -> SamplerOutput:
    """Sample one token per row of ``logits`` ([B, V], any float dtype) under ``t``.

    Pure: ``logits`` is not modified. See the module docstring for the exact semantics.

    ``use_kernel``: None (default) runs the fused Triton kernel of ``rollout.kernels.sampling`` when
    it applies (CUDA logits of dtype f32/f16/bf16, Triton importable, no row with top-k / top-p /
    min-p) and the torch path otherwise; both give the same tokens and, within float32 rounding,
    the same logprobs. True forces the kernel (``ValueError`` where it does not apply; on CPU it
    needs TRITON_INTERPRET=1 before the kernel module's import); False forces the torch path.
    """
    _check_inputs(logits, t)
    if use_kernel is None:
        use_kernel = _kernel_applies(logits, t) and _kernel_module() is not None
    if use_kernel:
        return _sample_with_kernel(logits, t)
    logits = logits.float()  # may alias the caller's tensor: only out-of-place ops on it below
    processed = _processed_logits(logits, t)
    if t.all_greedy:
        token_ids = processed.argmax(dim=-1)
    else:
        log_e = log_exponential(t.seeds, t.offsets, t.vocab_size)
        if t.any_greedy:
            log_e = log_e.masked_fill_(t.greedy[:, None], 0.0)  # no noise: the race becomes argmax
        token_ids = (processed - log_e).argmax(dim=-1)

    # One [B, V] source in each row's mode; logsumexp + gather avoids a full log_softmax.
    source = torch.where(t.processed_mode[:, None], processed, logits) if t.any_processed else logits
    lse = source.logsumexp(dim=-1, keepdim=True)
    chosen = source.gather(1, token_ids[:, None])
    token_logprobs = (chosen - lse).squeeze(1)
    k = min(t.max_num_logprobs, t.vocab_size)
    if k == 0:
        return SamplerOutput(token_ids, token_logprobs, None, None, None)
    top_vals, top_ids = source.topk(k, dim=-1)
    ranks = (source > chosen).sum(dim=-1) + 1
    return SamplerOutput(token_ids, token_logprobs, top_ids, top_vals - lse, ranks)


def prompt_logprobs(
    logits: torch.Tensor, next_ids: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw logprobs of prompt tokens: ``logits[i]`` predicts ``next_ids[i]``.

    Returns ``(logprobs [N] f32, topk_ids [N, k] i64, topk_logprobs [N, k] f32)`` of
    ``log_softmax(logits)`` (always the raw distribution: prompt tokens are not sampled). ``k`` is
    clamped to V; ``k == 0`` gives [N, 0] tensors. The caller chunks N to bound the [N, V] temporaries.
    """
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be a 2-D float tensor, got {tuple(logits.shape)} {logits.dtype}")
    if next_ids.shape != logits.shape[:1] or next_ids.dtype != torch.int64:
        raise ValueError(
            f"next_ids must be int64 of shape [{logits.shape[0]}], "
            f"got {tuple(next_ids.shape)} {next_ids.dtype}"
        )
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= MAX_LOGPROBS:
        raise ValueError(f"k must be an int in [0, {MAX_LOGPROBS}], got {k!r}")
    logits = logits.float()
    lse = logits.logsumexp(dim=-1, keepdim=True)
    token_logprobs = (logits.gather(1, next_ids[:, None]) - lse).squeeze(1)
    top_vals, top_ids = logits.topk(min(k, logits.shape[1]), dim=-1)
    return token_logprobs, top_ids, top_vals - lse


def _kernel_applies(logits: torch.Tensor, t: SamplingTensors) -> bool:
    """Host-only test: could the fused kernel sample this batch (bar Triton being importable)?"""
    return (
        logits.is_cuda
        and logits.dtype in (torch.float32, torch.float16, torch.bfloat16)
        and not (t.any_top_k or t.any_top_p or t.any_min_p)
        and t.penalties is None
        and t.logit_bias is None
    )


def _kernel_module() -> ModuleType | None:
    """``rollout.kernels.sampling``, or None where Triton cannot be imported (cached by sys.modules)."""
    try:
        from rollout.kernels import sampling
    except ImportError:
        return None
    return sampling


def _sample_with_kernel(logits: torch.Tensor, t: SamplingTensors) -> SamplerOutput:
    """``sample`` through the fused kernel: one pass over the logits for tokens, logprobs and lse.

    Top-k logprobs and ranks (K > 0) still use torch on the row's logprob source: the raw logits
    themselves when no row is in processed mode, else the [B, V] f32 source the kernel wrote in
    its pass; top values minus the kernel's lse give the logprobs (no log_softmax pass).
    """
    if _kernel_module() is None:
        raise ValueError("use_kernel=True but rollout.kernels.sampling cannot be imported (no Triton?)")
    if t.any_top_k or t.any_top_p or t.any_min_p or t.penalties is not None or t.logit_bias is not None:
        raise ValueError(
            "use_kernel=True but the batch has top-k / top-p / min-p, penalty or logit-bias rows: the "
            "kernel has no filters, penalties or biases"
        )
    k = min(t.max_num_logprobs, t.vocab_size)
    out = fused_kernel(
        logits,
        t,
        all_greedy=t.all_greedy,
        any_processed=t.any_processed,
        write_source=k > 0 and t.any_processed,
    )
    source = out.source if out.source is not None else logits
    return fused_output(out.token_ids, out.logprobs, out.lse, source, k)


def fused_kernel(
    logits: torch.Tensor,
    t: SamplingTensors,
    *,
    all_greedy: bool,
    any_processed: bool,
    write_source: bool = False,
) -> FusedSampleOutput:
    """``rollout.kernels.sampling.fused_sample`` over ``logits`` with ``t``'s per-row tensors and the
    given kernel variant (``t``'s own host flags, or the general ``all_greedy=False,
    any_processed=True`` that serves any rows, as a sampler graph captures it). Needs Triton."""
    from rollout.kernels.sampling import fused_sample

    return fused_sample(
        logits,
        t.temperature,
        t.greedy,
        t.seeds,
        t.offsets,
        t.processed_mode,
        t.banned_rows,
        t.banned_tokens,
        all_greedy=all_greedy,
        any_processed=any_processed,
        write_source=write_source,
    )


def fused_output(
    token_ids: torch.Tensor, logprobs: torch.Tensor, lse: torch.Tensor, source: torch.Tensor, k: int
) -> SamplerOutput:
    """``sample``'s output from the fused kernel's tokens, logprobs and lse: with ``k`` > 0 top
    logprobs, the top-k and ranks of each row's logprob ``source`` ([B, V]: the kernel's, or the
    raw logits where no row is in processed mode), less the lse."""
    if k == 0:
        return SamplerOutput(token_ids, logprobs, None, None, None)
    top_vals, top_ids = source.topk(k, dim=-1)
    chosen = source.gather(1, token_ids[:, None]).float()  # exact: bf16/f16 -> f32 is lossless
    ranks = (source > chosen).sum(dim=-1) + 1
    return SamplerOutput(token_ids, logprobs, top_ids, top_vals.float() - lse[:, None], ranks)


def _check_inputs(logits: torch.Tensor, t: SamplingTensors) -> None:
    # Shapes, dtypes and devices are host metadata: checking them costs no sync.
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be a 2-D float tensor, got {tuple(logits.shape)} {logits.dtype}")
    if tuple(logits.shape) != (t.batch_size, t.vocab_size):
        raise ValueError(
            f"logits shape {tuple(logits.shape)} does not match the sampling tensors "
            f"[{t.batch_size}, {t.vocab_size}]"
        )
    if logits.device != t.temperature.device:
        raise ValueError(f"logits on {logits.device} but sampling tensors on {t.temperature.device}")


def _processed_logits(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """Temperature, bans and filters applied; unnormalized. Never writes to ``logits``."""
    x = logits
    if t.logit_bias is not None:
        rows, tokens, biases = t.logit_bias
        x = x.index_put((rows, tokens), biases, accumulate=True)  # out of place
    if t.penalties is not None:
        x = _apply_penalties(x, t.penalties)
    # Greedy rows carry temperature 1, so an all-greedy batch needs no division at all.
    x = x if t.all_greedy else x / t.temperature[:, None]
    if t.banned_rows.shape[0] > 0:
        if x is logits:
            x = x.clone()
        x.index_put_((t.banned_rows, t.banned_tokens), x.new_full((), _NEG_INF))
    if t.any_top_p:
        x = _mask_top_k_top_p_sorted(x, t.top_k, t.top_p)
    elif t.any_top_k:
        x = _mask_top_k(x, t.top_k, t.max_top_k)
    if t.any_min_p:
        # p_i < min_p * p_max  <=>  x_i < x_max + log(min_p); renormalization cancels out, and
        # log(0) = -inf makes min_p = 0 a no-op without a branch.
        cutoff = x.amax(dim=-1, keepdim=True) + torch.log(t.min_p)[:, None]
        x = x.masked_fill(x < cutoff, _NEG_INF)
    return x


def _apply_penalties(x: torch.Tensor, p: PenaltyTensors) -> torch.Tensor:
    """Repetition (prompt and output tokens), then frequency and presence (output tokens) penalties,
    on float32 logits, out of place. Rows without penalties come out unchanged (0, 0 and 1 are exact
    no-ops)."""
    if p.seen is not None:
        rep = p.repetition[:, None]
        x = torch.where(p.seen, torch.where(x > 0, x / rep, x * rep), x)
    counts = p.output_counts
    return x - p.frequency[:, None] * counts - p.presence[:, None] * (counts > 0)


def _mask_top_k(x: torch.Tensor, top_k: torch.Tensor, max_top_k: int) -> torch.Tensor:
    """Top-k without a full sort: the k-th largest value of each row from one topk(max_top_k)."""
    top_vals = x.topk(max_top_k, dim=-1).values  # [B, max_top_k], descending
    kth = top_vals.gather(1, (top_k.clamp(max=max_top_k).long() - 1)[:, None])
    # Rows with top-k off (top_k == V) may exceed max_top_k: give them no threshold.
    kth = kth.masked_fill((top_k >= x.shape[1])[:, None], _NEG_INF)
    return x.masked_fill(x < kth, _NEG_INF)


def _mask_top_k_top_p_sorted(x: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Top-k then top-p over a full descending sort, reduced to one threshold value per row."""
    sorted_vals = x.sort(dim=-1, descending=True).values
    probs = sorted_vals.softmax(dim=-1)
    cum = probs.cumsum(dim=-1)
    k_idx = top_k.long()[:, None] - 1
    # Mass before each sorted position, as a shifted cumsum (monotone, and exactly 0 at the top).
    mass_before = F.pad(cum[:, :-1], (1, 0))
    # top-p on the top-k-renormalized distribution: mass_before / mass_k < top_p.
    mass_k = cum.gather(1, k_idx)
    # The top token is always in (its mass before is 0, but top_p * mass_k can round to 0 too).
    in_nucleus = (mass_before < top_p[:, None] * mass_k).sum(dim=-1, keepdim=True).clamp_(min=1)
    # top_p == 1 must keep everything even where float32 cumsum rounding reaches 1 early. (The
    # minimum with k is exact-arithmetic redundant, as mass_before >= mass_k past k; it guards rounding.)
    num_keep = torch.where(top_p[:, None] < 1.0, torch.minimum(in_nucleus, k_idx + 1), k_idx + 1)
    threshold = sorted_vals.gather(1, num_keep - 1)
    return x.masked_fill(x < threshold, _NEG_INF)
