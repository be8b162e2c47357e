"""The engine core: admission and validation, the schedule -> execute -> update loop, stop checks.

This is the in-process engine (tests, and trainers that embed the engine). ``LLM`` drives it.
"""

from __future__ import annotations

import gc
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from rollout import validation
from rollout.block_manager import BlockManager
from rollout.config import CacheConfig, RunnerConfig, SchedulerConfig
from rollout.detokenizer import Detokenizer
from rollout.memory import DeviceMemory
from rollout.model_runner import ModelRunner, RunnerOutput, StepHandle
from rollout.models.config import ModelConfig
from rollout.outputs import CompletionOutput, NewTokens, RequestDelta, RequestOutput, SampleDelta
from rollout.presets import resolve_model
from rollout.request import Request, RequestStatus
from rollout.samplers.params import SamplingParams
from rollout.scheduler import ScheduledBatch, Scheduler
from rollout.weight_sync.receiver import WeightReceiver

MAX_WEIGHT_VERSION = 2**63 - 1  # int64: what the outputs, the messages and the prefix-cache salt hold
_SEED_STRIDE = 0x9E3779B97F4A7C15  # spreads the seeds of the n samples of one seeded prompt
_UINT64_MASK = 2**64 - 1


def sample_ids(request_id: str, n: int) -> list[str]:
    """The ids of a prompt's samples: the request id itself for n = 1, ``rid#i`` for n > 1."""
    return [request_id] if n == 1 else [f"{request_id}#{i}" for i in range(n)]


@dataclass
class _Group:
    """The n samples of one prompt."""

    request_id: str
    prompt_token_ids: list[int]
    prompt: str | None
    children: list[Request] = field(default_factory=list)
    # Streaming cursors (``step_deltas``): output tokens already reported per sample, samples whose
    # finish was reported, whether the prompt ids / prompt logprobs went out.
    reported: list[int] = field(default_factory=list)
    finish_reported: list[bool] = field(default_factory=list)
    # per sample: (num_cached_tokens, num_preemptions) as of its last full delta
    reported_counts: list[tuple[int, int]] = field(default_factory=list)
    prompt_reported: bool = False
    prompt_logprobs_reported: bool = False


@dataclass
class EngineStats:
    """Counters since the engine started."""

    num_prompt_tokens: int  # prompt tokens submitted (summed over samples)
    num_prompt_tokens_computed: int  # prompt tokens that went through the model
    num_cached_tokens: int  # prompt tokens served by the prefix cache at admission
    num_output_tokens: int  # tokens sampled
    num_preemptions: int
    num_free_blocks: int
    num_blocks: int


class EngineCore:
    """Generates tokens for many requests at once on one device."""

    def __init__(
        self,
        model: str,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype = "auto",
        load_format: str = "auto",
        max_model_len: int | None = None,
        cache_config: CacheConfig | None = None,
        scheduler_config: SchedulerConfig | None = None,
        runner_config: RunnerConfig | None = None,
        seed: int = 0,
    ) -> None:
        path, load_format = resolve_model(model, load_format)
        self.device = resolve_device(device)
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)  # kernels, graphs and streams go to the current device
        self.model_config = ModelConfig.from_pretrained(
            path, dtype=dtype, max_model_len=max_model_len, device=self.device
        )
        self.cache_config = cache_config or CacheConfig()
        self.scheduler_config = scheduler_config or SchedulerConfig()
        self.runner = ModelRunner(
            self.model_config,
            self.cache_config,
            self.scheduler_config,
            self.device,
            load_format,
            seed,
            runner_config,
        )
        bs = self.cache_config.block_size
        self.blocks = BlockManager(self.runner.num_blocks, bs, self.cache_config.enable_prefix_caching)
        self.scheduler = Scheduler(self.scheduler_config, self.blocks)
        self.detokenizer = Detokenizer.from_pretrained(path)
        # A sequence may not outgrow the context nor the whole cache (it could never be scheduled),
        # nor, without chunked prefill, one step's token budget (its prompt, or its recompute after
        # a preemption, must then fit one step).
        self.max_total_tokens = min(self.model_config.max_model_len, self.runner.num_blocks * bs)
        if not self.scheduler_config.enable_chunked_prefill:
            self.max_total_tokens = min(self.max_total_tokens, self.scheduler_config.max_num_batched_tokens)
        self.weight_version = 0  # of the weights serving now; every output token records it
        self.weights = WeightReceiver(self.runner.model, self.device)
        self.memory = DeviceMemory(self.runner)
        self._weights_dropped = False  # sleep(2) dropped them; an update must refill them
        self._rng = random.Random(seed)
        self._groups: dict[str, _Group] = {}
        self._arrivals = 0
        self._num_prompt_tokens = 0
        self._num_output_tokens = 0
        sc = self.scheduler_config
        self.overlap = sc.overlap if sc.overlap is not None else self.device.type == "cuda"
        # The step running on the device whose results are not applied yet (overlapped loop):
        # (batch, handle, weight version it runs under).
        self._inflight: tuple[ScheduledBatch, StepHandle, int] | None = None
        if self.device.type == "cuda":
            # Freeze again now that the tokenizer and everything else the engine holds exists (the
            # runner froze the heap before they did): see ModelRunner.__init__.
            gc.collect()
            gc.freeze()

    # ---- admission --------------------------------------------------------------------------
    def tokenize(self, prompt: str | Sequence[int]) -> tuple[list[int], str | None]:
        """Validate a prompt (text or token ids) and return its token ids (and text, if given)."""
        encode = None if self.detokenizer is None else self.detokenizer.encode
        return validation.prompt_to_ids(prompt, encode, self.model_config.vocab_size, self.max_total_tokens)

    def check_params(self, params: SamplingParams) -> None:
        validation.check_params(params, self.model_config.vocab_size, self.detokenizer is not None)

    def add_request(self, request_id: str, prompt: str | Sequence[int], params: SamplingParams) -> None:
        """Queue one prompt (its n samples). Raises ValueError and changes nothing on bad input."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling params must be SamplingParams, got {type(params).__name__}")
        ids, text = self.tokenize(prompt)
        self.check_params(params)
        self.add_tokenized(request_id, ids, text, params)

    def check_request_id(self, request_id: str, n: int) -> None:
        """Raise ``ValueError`` if a prompt ``request_id`` with ``n`` samples would clash with a
        request in the engine: its id, or a sample id (see ``sample_ids``)."""
        if request_id in self._groups:
            raise ValueError(f"request_id {request_id!r} is already in use")
        for sample_id in sample_ids(request_id, n):  # samples are keyed by their ids: no two alike
            owner = self._sample_owner(sample_id)
            if owner is not None:
                raise ValueError(
                    f"request_id {request_id!r}: sample id {sample_id!r} is taken by request {owner!r}"
                )

    def add_tokenized(
        self, request_id: str, ids: list[int], text: str | None, params: SamplingParams
    ) -> None:
        """``add_request`` for a prompt already through ``tokenize`` (``ids``, ``text``) and params
        through ``check_params``; the request id is checked here."""
        self.check_request_id(request_id, params.n)
        group = _Group(request_id, ids, text)
        eos = frozenset() if params.ignore_eos else frozenset(self.model_config.eos_token_ids)
        limit = min(self.max_total_tokens, len(ids) + params.max_tokens)
        for i, child_id in enumerate(sample_ids(request_id, params.n)):
            if params.seed is None:
                seed = self._rng.getrandbits(63)
            else:
                # Two's complement of (seed + i * stride) mod 2**64: distinct seeds modulo 2**64
                # stay distinct (as torch.manual_seed, -1 and 2**64 - 1 are one seed)
                seed = (params.seed + i * _SEED_STRIDE) & _UINT64_MASK
                seed -= (seed >> 63) << 64
            leader = group.children[0] if group.children and self.cache_config.enable_prefix_caching else None
            req = Request(child_id, ids, params, seed, eos, limit, self._arrivals, request_id, leader)
            if params.prompt_logprobs is not None:  # the first prompt token has no logprob; a
                # 1-token prompt has no other (no step ever reports prompt rows for it)
                req.prompt_logprobs.append(None)
                req.prompt_top_logprobs.append(None)
            self._arrivals += 1
            group.children.append(req)
        self._groups[request_id] = group
        for req in group.children:
            self.scheduler.add(req)
        self._num_prompt_tokens += len(ids) * params.n

    def _sample_owner(self, sample_id: str) -> str | None:
        """The request in the engine with a sample of this id (``rid`` for n = 1, ``rid#i`` else):
        only ``sample_id`` itself or the part before its last '#' can own it."""
        for owner in (sample_id, sample_id.rpartition("#")[0]):
            group = self._groups.get(owner)
            if group is not None and any(r.request_id == sample_id for r in group.children):
                return owner
        return None

    def abort(self, request_ids: Sequence[str]) -> list[RequestOutput]:
        """Finish these requests now with reason "abort", keeping their partial outputs. Unknown or
        already finished ids are ignored."""
        return [self._output(group) for group in self._abort(request_ids)]

    def abort_deltas(self, request_ids: Sequence[str]) -> list[RequestDelta]:
        """``abort`` for streaming: the last delta of each aborted prompt (its unreported tokens and
        finish reason "abort")."""
        return [self._delta(group) for group in self._abort(request_ids)]

    def _abort(self, request_ids: Sequence[str]) -> list[_Group]:
        groups = []
        for rid in request_ids:
            group = self._groups.pop(rid, None)
            if group is None:
                continue
            for req in group.children:
                self.scheduler.finish(req, "abort")
            groups.append(group)
        return groups

    @property
    def request_ids(self) -> list[str]:
        """Ids of the prompts in the engine (queued or running), in arrival order."""
        return list(self._groups)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- the loop ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one step; return the outputs of the prompts that finished in it."""
        finished = []
        for group in self._step():
            if all(r.status is RequestStatus.FINISHED for r in group.children):
                del self._groups[group.request_id]
                finished.append(self._output(group))
        return finished

    def step_deltas(self) -> list[RequestDelta]:
        """Run one step; return what every prompt that got tokens gained in it (streaming). Use one
        of this, ``step_outputs`` or ``step`` on an engine: the delta cursors only advance in the
        first two."""
        deltas = []
        for group in self._step():
            delta = self._delta(group)
            if delta.finished:
                del self._groups[group.request_id]
            deltas.append(delta)
        return deltas

    def step_outputs(self) -> tuple[list[RequestDelta], NewTokens]:
        """``step_deltas`` in the form the core sends: the common case (a sample gained one token and
        nothing else changed) in columns, every other prompt as a full ``RequestDelta``. A decode step
        of a large batch then costs a few list appends per sample instead of two objects."""
        deltas: list[RequestDelta] = []
        tokens = NewTokens()
        for group in self._step():
            if self._new_token_only(group, tokens):
                continue
            delta = self._delta(group)
            if delta.finished:
                del self._groups[group.request_id]
            deltas.append(delta)
        return deltas, tokens

    def _new_token_only(self, group: _Group, tokens: NewTokens) -> bool:
        """If each sample of ``group`` with news gained exactly one token this step and has nothing
        else to report, append those tokens to ``tokens``, advance the cursors and return True."""
        reported = group.reported
        if not reported:
            return False  # a prompt's first delta is always a full one
        params = group.children[0].params
        if params.logprobs or (params.prompt_logprobs is not None and not group.prompt_logprobs_reported):
            return False
        news = []
        for i, req in enumerate(group.children):
            new = len(req.token_ids) - len(req.prompt_token_ids) - reported[i]
            finished = req.status is RequestStatus.FINISHED
            if new == 0 and (not finished or group.finish_reported[i]):
                continue
            if new != 1 or finished:
                return False
            if group.reported_counts[i] != (req.num_cached_tokens, req.num_preemptions):
                return False
            news.append(i)
        for i in news:
            req = group.children[i]
            tokens.request_ids.append(group.request_id)
            tokens.indexes.append(i)
            tokens.token_ids.append(req.token_ids[-1])
            tokens.logprobs.append(req.output_logprobs[-1])
            tokens.weight_versions.append(req.output_versions[-1])
            reported[i] += 1
        return True

    def _step(self) -> list[_Group]:
        """Schedule, execute and apply one step; return the groups that got a token."""
        if self.memory.level:
            raise RuntimeError("the engine is asleep: wake_up() first")
        if not self.weights_valid:
            raise RuntimeError("the engine's weights are incomplete: send a complete update first")
        # Overlapped loop: step N+1 is scheduled and enqueued (its decodes read step N's sampled
        # tokens on the device) before N's results are read and applied; see SchedulerConfig.overlap.
        batch = self.scheduler.schedule()
        launched = None
        if not batch.is_empty:
            self.scheduler.update_computed(batch)
            prev = self._inflight[1] if self._inflight is not None else None
            launched = (batch, self.runner.launch(batch, prev), self.weight_version)
        if not self.overlap:
            self._inflight, launched = launched, None
        groups = self._apply_inflight()
        self._inflight = launched
        if self._inflight is not None and not self.scheduler.has_unfinished():
            groups += self._apply_inflight()  # only finished requests in it: an idle engine has none
        return groups

    def _apply_inflight(self) -> list[_Group]:
        """Wait for the step in flight (if any) and apply its results."""
        if self._inflight is None:
            return []
        batch, handle, version = self._inflight
        self._inflight = None
        return self._process(batch, self.runner.collect(handle), version)

    def _process(self, batch: ScheduledBatch, out: RunnerOutput, version: int) -> list[_Group]:
        # Runs for every sampled token: kept to a few list operations per token on the common path.
        touched: dict[str, None] = {}
        prompt_lps = out.prompt_logprobs
        token_ids, logprobs, tops = out.token_ids, out.logprobs, out.top_logprobs
        i = appended = 0
        for s in batch.requests:
            req = s.request
            if prompt_lps and req.request_id in prompt_lps:
                lps, top_lps = prompt_lps[req.request_id]
                # entry j is prompt token start + 1 + j; a recompute after preemption repeats some
                skip = max(len(req.prompt_logprobs) - 1 - s.start, 0)
                req.prompt_logprobs.extend(lps[skip:])
                req.prompt_top_logprobs.extend(top_lps[skip:])
            if not s.sample:
                continue
            token = token_ids[i]
            if req.status is RequestStatus.FINISHED:
                req.num_pending -= 1  # stopped or aborted while this step ran: drop its token
            else:
                req.token_ids.append(token)
                self.scheduler.token_appended(req)
                req.output_logprobs.append(logprobs[i])
                top = tops[i]
                if top is not None:
                    req.output_top_logprobs.append(top)
                req.output_versions.append(version)  # the weights of the step that computed it
                self._check_stop(req, token)
                touched[req.group_id] = None
                appended += 1
            i += 1
        self._num_output_tokens += appended
        return [self._groups[gid] for gid in touched]

    def _check_stop(self, req: Request, token: int) -> None:
        """Finish ``req`` if the token it just appended ends it."""
        params = req.params
        if token in params.stop_token_ids:
            self.scheduler.finish(req, "stop", token)
        elif token in req.eos_token_ids:
            self.scheduler.finish(req, "stop", None)
        elif params.stop and (hit := self._stop_string(req)) is not None:
            self.scheduler.finish(req, "stop", hit)
        elif len(req.token_ids) >= req.max_total_tokens:
            self.scheduler.finish(req, "length")

    def _stop_string(self, req: Request) -> str | None:
        """The stop string the output now holds, searched from the token after the first
        ``min_tokens`` (vLLM's rule, the one EOS and stop token ids follow: none of them can end the
        output before token min_tokens + 1)."""
        assert self.detokenizer is not None  # check_params refuses stop strings without a tokenizer
        return self.detokenizer.check_stop(req, search=req.num_output_tokens > req.params.min_tokens)

    def _output(self, group: _Group) -> RequestOutput:
        outputs = []
        for i, req in enumerate(group.children):
            text = None
            if self.detokenizer is not None and req.params.detokenize:
                text = self.detokenizer.final_text(req)
            outputs.append(
                CompletionOutput(
                    index=i,
                    token_ids=req.output_token_ids,
                    logprobs=list(req.output_logprobs),
                    top_logprobs=list(req.output_top_logprobs) if req.params.logprobs else None,
                    weight_versions=list(req.output_versions),
                    finish_reason=req.finish_reason,
                    stop_reason=req.stop_reason,
                    text=text,
                    num_cached_tokens=max(req.num_cached_tokens, 0),
                    num_preemptions=req.num_preemptions,
                )
            )
        first = group.children[0]
        wants_prompt_lp = first.params.prompt_logprobs is not None
        return RequestOutput(
            request_id=group.request_id,
            prompt_token_ids=group.prompt_token_ids,
            outputs=outputs,
            prompt_logprobs=list(first.prompt_logprobs) if wants_prompt_lp else None,
            prompt_top_logprobs=list(first.prompt_top_logprobs) if wants_prompt_lp else None,
            prompt=group.prompt,
            finished=all(r.is_finished for r in group.children),
            num_cached_tokens=sum(o.num_cached_tokens for o in outputs),
        )

    def _delta(self, group: _Group) -> RequestDelta:
        """What ``group`` gained since its previous delta; advances its cursors."""
        if not group.reported:
            group.reported = [0] * len(group.children)
            group.finish_reported = [False] * len(group.children)
            group.reported_counts = [(0, 0)] * len(group.children)
        samples = []
        for i, req in enumerate(group.children):
            start = group.reported[i]
            new = req.num_output_tokens - start
            done = req.is_finished and not group.finish_reported[i]
            if new == 0 and not done:
                continue
            first = req.num_prompt_tokens + start
            text = None
            if done and self.detokenizer is not None and req.params.detokenize:
                text = self.detokenizer.final_text(req)
            samples.append(
                SampleDelta(
                    index=i,
                    token_ids=req.token_ids[first:],
                    logprobs=req.output_logprobs[start:],
                    top_logprobs=req.output_top_logprobs[start:] if req.params.logprobs else None,
                    weight_versions=req.output_versions[start:],
                    finish_reason=req.finish_reason,
                    stop_reason=req.stop_reason,
                    text=text,
                    num_cached_tokens=max(req.num_cached_tokens, 0),
                    num_preemptions=req.num_preemptions,
                )
            )
            group.reported[i] = req.num_output_tokens
            group.finish_reported[i] = req.is_finished
            group.reported_counts[i] = (req.num_cached_tokens, req.num_preemptions)
        finished = all(r.is_finished for r in group.children)
        delta = RequestDelta(group.request_id, samples, finished)
        if not group.prompt_reported and group.prompt is not None:
            delta.prompt_token_ids = group.prompt_token_ids
        group.prompt_reported = True
        first = group.children[0]
        if (
            first.params.prompt_logprobs is not None
            and not group.prompt_logprobs_reported
            and (first.num_output_tokens > 0 or finished)
        ):
            delta.prompt_logprobs = list(first.prompt_logprobs)
            delta.prompt_top_logprobs = list(first.prompt_top_logprobs)
            group.prompt_logprobs_reported = True
        return delta

    # ---- weights and memory (see rollout.weight_sync, rollout.memory) -----------------------
    @property
    def weights_valid(self) -> bool:
        """False while the weights are a failed update's mix of old and new, or were dropped by
        ``sleep(2)``: the engine then serves nothing until a complete update arrives."""
        return not self.weights.dirty and not self._weights_dropped

    def next_weight_version(self, version: int | None) -> int:
        """The version an update will set: ``version`` (above the current one) or current + 1."""
        if version is None:
            if self.weight_version >= MAX_WEIGHT_VERSION:  # current + 1 would leave int64
                raise ValueError(f"weight version {self.weight_version} is the largest there is (int64)")
            return self.weight_version + 1
        bad = not isinstance(version, int) or isinstance(version, bool)
        if bad or not self.weight_version < version <= MAX_WEIGHT_VERSION:
            raise ValueError(
                f"weight version must be an int above the current {self.weight_version} and at most"
                f" {MAX_WEIGHT_VERSION}, got {version!r}"
            )
        return version

    def check_can_update(self) -> None:
        if not self.memory.weights_on_device:
            raise ValueError("the weights are released by sleep(): wake_up(tags=['weights']) first")

    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]], version: int | None = None) -> int:
        """Replace the weights in place from ``(hf_name, tensor)`` pairs (same process). The whole
        set is validated first: a bad name, shape or dtype raises ``ValueError`` and changes nothing.
        Requests in flight continue on the new weights. Returns the new weight version."""
        self.check_can_update()
        new = self.next_weight_version(version)
        self.weights.apply_tensors(weights)
        return self.commit_weights(new)

    def update_weights_from_disk(self, path: str, version: int | None = None) -> int:
        """``update_weights`` from a safetensors directory (e.g. the trainer's ``save_pretrained``)."""
        self.check_can_update()
        new = self.next_weight_version(version)
        self.weights.apply_disk(path)
        return self.commit_weights(new)

    def commit_weights(self, version: int) -> int:
        """Finish a complete update: new version, and a prefix cache that cannot serve KV computed
        under older weights (the hash chains are salted with the version)."""
        self.weights.mark_complete()
        self._weights_dropped = False
        self.blocks.reset_prefix_cache()
        self.blocks.hash_salt = version.to_bytes(8, "little")
        self.scheduler.weights_changed()  # in-flight KV is older than the new salt: never cached
        self.weight_version = version
        return version

    def sleep(self, level: int = 1) -> dict[str, float]:
        """Release device memory (see ``rollout.memory``); no request may be in the engine."""
        if self.has_unfinished():
            raise ValueError("requests are in flight: abort or finish them before sleep()")
        info = self.memory.sleep(level)
        self.blocks.reset_prefix_cache()  # the KV contents are gone
        self._weights_dropped = self._weights_dropped or level == 2
        return info

    def wake_up(self, tags: list[str] | None = None) -> dict[str, float]:
        """Restore released memory (``tags``: "weights", "kv_cache"; both by default)."""
        return self.memory.wake_up(tags)

    # ---- introspection ----------------------------------------------------------------------
    def stats(self) -> EngineStats:
        return EngineStats(
            num_prompt_tokens=self._num_prompt_tokens,
            num_prompt_tokens_computed=self.scheduler.num_prompt_tokens_computed,
            num_cached_tokens=self.blocks.num_hit_tokens,
            num_output_tokens=self._num_output_tokens,
            num_preemptions=self.scheduler.num_preemptions,
            num_free_blocks=self.blocks.num_free_blocks,
            num_blocks=self.blocks.num_blocks,
        )

    def check_invariants(self) -> None:
        """Assert the block pool matches what live requests hold (tests)."""
        held = [r.block_ids for r in (*self.scheduler.running, *self.scheduler.waiting)]
        self.blocks.check_invariants(held)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a torch device (None: cuda when available, else cpu); ValueError for one this
    machine cannot run (a typo, cuda without CUDA, other kinds)."""
    if device is None:
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r} is not a device: {e}") from None
    if dev.type not in ("cuda", "cpu"):
        raise ValueError(f"device {device!r}: only cuda and cpu are supported")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available on this machine")
    return dev
