"""Continuous batching without phases.

Every request has ``num_computed_tokens`` that catches up to its token count under a per-step token
budget: a long prompt is prefilled in chunks, decodes (one token) and prefill chunks share a step,
and a request samples in the step where its computed tokens reach its length. Running requests are
served first in arrival order; waiting ones are admitted FIFO while budget, sequence slots and KV
blocks last. When blocks run out, the newest running request is preempted: its blocks are freed and
it recomputes later (its full blocks usually come back from the prefix cache).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from rollout.block_manager import BlockManager
from rollout.config import SchedulerConfig
from rollout.request import Request, RequestStatus


@dataclass(slots=True)
class ScheduledRequest:
    """One request's share of a step."""

    request: Request
    start: int  # num_computed_tokens before this step: first position computed now
    num_new_tokens: int  # tokens computed this step (a prefill chunk, or 1 for a decode)
    sample: bool  # this step reaches the end of the request's tokens, so it samples the next one


@dataclass
class ScheduledBatch:
    """Everything the model runner needs for one step, in batch order."""

    requests: list[ScheduledRequest]  # requests computed this step
    num_tokens: int  # sum of num_new_tokens
    preempted: list[Request] = field(default_factory=list)  # requests that lost their blocks this step

    @property
    def is_empty(self) -> bool:
        return not self.requests


class Scheduler:
    """Decides each step's batch and applies its results to request state. Plain CPU Python."""

    def __init__(self, config: SchedulerConfig, blocks: BlockManager) -> None:
        self.config = config
        self.blocks = blocks
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.num_prompt_tokens_computed = 0  # prompt tokens that went through the model (metrics, W2)

    # ---- queue management -------------------------------------------------------------------
    def add(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, request: Request, reason: str, stop_reason: int | str | None = None) -> None:
        """End a request (any state) and return its blocks. Idempotent."""
        if request.is_finished:
            return
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self.blocks.free(request.block_ids)
        request.block_ids = []
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        request.stop_reason = stop_reason

    # ---- scheduling -------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: list[Request] = []
        bs = self.blocks.block_size
        running = self.running
        i = 0
        while i < len(running) and budget > 0:
            req = running[i]
            pending = req.num_pending
            known = len(req.token_ids) + pending
            if pending and known >= req.max_total_tokens:
                i += 1  # its in-flight token ends it ("length"): no speculative slot
                continue
            start = req.num_computed_tokens
            n = known - start
            if n > budget:
                n = budget
            # (A decode step mostly fits in the blocks it holds: skip the allocator then.)
            if start + n > len(req.block_ids) * bs:
                while not self._grow(req, start + n):
                    victim = running[-1]
                    self._preempt(victim)
                    preempted.append(victim)
                    if victim is req:
                        break
                if req.status is not RequestStatus.RUNNING:
                    break  # preempted itself: nothing later in the list remains either
            scheduled.append(ScheduledRequest(req, start, n, sample=start + n == known))
            budget -= n
            i += 1
        if not preempted:
            self._admit(scheduled, budget)
        return ScheduledBatch(scheduled, sum(s.num_new_tokens for s in scheduled), preempted)

    def _admit(self, scheduled: list[ScheduledRequest], budget: int) -> None:
        """Move waiting requests to running, FIFO, while budget, slots and blocks allow."""
        skipped: list[Request] = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting.popleft()
            leader = req.leader
            if leader is not None and not leader.is_finished and leader.in_prefill:
                skipped.append(req)  # its prompt is being computed by a sibling: share it instead
                continue
            self._match_prefix(req)
            remaining = req.num_tokens - req.num_computed_tokens
            n = min(remaining, budget)
            if n < remaining and not self.config.enable_chunked_prefill:
                self._unmatch(req)
                self.waiting.appendleft(req)
                break
            if not self._grow(req, req.num_computed_tokens + n):
                self._unmatch(req)
                self.waiting.appendleft(req)
                break
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            if req.num_cached_tokens < 0:  # first admission: count what the cache saved
                req.num_cached_tokens = min(req.num_computed_tokens, req.num_prompt_tokens)
                self.blocks.num_hit_tokens += req.num_cached_tokens
                self.blocks.num_queried_tokens += req.num_prompt_tokens
            scheduled.append(self._entry(req, n))
            budget -= n
        self.waiting.extendleft(reversed(skipped))

    def _entry(self, req: Request, n: int) -> ScheduledRequest:
        start = req.num_computed_tokens
        return ScheduledRequest(req, start, n, sample=start + n == req.num_tokens + req.num_pending)

    def _match_prefix(self, req: Request) -> None:
        """Take cached blocks for the longest cached prefix of the request's tokens. At least one token
        is always left to compute (its logits are needed), so a full hit drops its last block."""
        if req.params.prompt_logprobs is not None:
            return  # prompt logprobs need every prompt position computed
        bs = self.blocks.block_size
        self.blocks.compute_hashes(req.token_ids, req.block_hashes)
        hits = self.blocks.match_prefix(req.block_hashes, (req.num_tokens - 1) // bs)
        self.blocks.acquire(hits)
        req.block_ids = hits
        req.num_computed_tokens = len(hits) * bs

    def _unmatch(self, req: Request) -> None:
        self.blocks.free(req.block_ids)
        req.block_ids = []
        req.num_computed_tokens = 0

    def _grow(self, req: Request, num_tokens: int) -> bool:
        need = self.blocks.blocks_needed(len(req.block_ids), num_tokens)
        if not self.blocks.can_allocate(need):
            return False
        req.block_ids.extend(self.blocks.allocate(need))
        return True

    def weights_changed(self) -> None:
        """After a weight update (the prefix cache reset, its salt changed): a request holding KV
        computed under the old weights never registers its blocks (they would be matched as new
        KV), until a preemption recomputes it; hashes under the old salt are dropped."""
        for req in (*self.running, *self.waiting):
            if req.num_computed_tokens > 0:
                req.cacheable = False
            req.block_hashes = []

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.blocks.free(req.block_ids)
        req.block_ids = []
        req.num_computed_tokens = 0
        req.cacheable = True  # recomputed from scratch under the current weights (its hashes were
        # dropped by weights_changed and, uncacheable, it computed none since)
        req.num_preemptions += 1
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)
        self.num_preemptions += 1

    # ---- results ----------------------------------------------------------------------------
    def update_computed(self, batch: ScheduledBatch) -> None:
        """Advance computed counts for a batch just scheduled (its KV is computed by the step) and
        cache the newly full blocks whose token ids are known. A sampling request's next token
        counts as pending (``num_pending``) until ``cache_appended`` sees it appended. Stream order
        on the device makes this safe before the step runs: any later reader of these blocks is a
        later step."""
        bs = self.blocks.block_size
        for s in batch.requests:
            req = s.request
            if req.status is RequestStatus.FINISHED:
                continue  # aborted while the step ran
            before = req.num_computed_tokens
            after = req.num_computed_tokens = before + s.num_new_tokens
            if s.sample:
                req.num_pending += 1
            num_prompt = len(req.prompt_token_ids)
            if before < num_prompt:
                self.num_prompt_tokens_computed += min(after, num_prompt) - before
            num_tokens = len(req.token_ids)
            full = (after if after < num_tokens else num_tokens) // bs
            if full > before // bs and req.cacheable:
                self.blocks.compute_hashes(req.token_ids[: full * bs], req.block_hashes)
                self.blocks.cache_blocks(req.block_ids, req.block_hashes, before // bs, full)

    def token_appended(self, req: Request) -> None:
        """A pending token of ``req`` was appended: cache the block it completes, if any (the block
        was computed with the token as a placeholder, so its hash could not be known before)."""
        req.num_pending -= 1
        num_tokens = len(req.token_ids)
        bs = self.blocks.block_size
        # The token completes a cached-to-be block only if it is a block's last token and that
        # block is computed (runs per token: the common case exits here).
        if num_tokens % bs or req.num_computed_tokens < num_tokens:
            return
        if req.status is not RequestStatus.RUNNING or not req.cacheable:
            return  # finished or preempted, or its KV predates the weights: nothing to cache
        full = num_tokens // bs
        self.blocks.compute_hashes(req.token_ids[: full * bs], req.block_hashes)
        self.blocks.cache_blocks(req.block_ids, req.block_hashes, full - 1, full)
