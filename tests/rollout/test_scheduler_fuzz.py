"""Scheduler + block manager under random workloads, with a simulated KV cache.

Every step writes (token, position) into the slots the scheduler gave the new tokens and then checks
that every position a request attends to holds its own token: a prefix-cache hit on the wrong block,
a block shared while being written, or a block freed too early all show up as a mismatch. Tokens
come from a deterministic function of the sequence so far, so preemption and prefix caching must not
change any output.
"""

import random

import pytest

from rollout.block_manager import BlockManager
from rollout.config import SchedulerConfig
from rollout.request import Request, RequestStatus
from rollout.samplers.params import SamplingParams
from rollout.scheduler import Scheduler


def next_token(tokens: list[int]) -> int:
    return (sum(tokens[-3:]) * 31 + len(tokens)) % 50


def make_workload(rng: random.Random, num: int) -> list[tuple[list[int], int, int]]:
    shared = [rng.randrange(50) for _ in range(rng.randint(1, 40))]
    work = []
    for _ in range(num):
        prompt = [rng.randrange(50) for _ in range(rng.randint(1, 30))]
        if rng.random() < 0.6:
            prompt = shared[: rng.randint(1, len(shared))] + prompt
        work.append((prompt, rng.randint(1, 25), rng.randint(1, 3)))  # prompt, max_tokens, n
    return work


def run(
    work, *, num_blocks, block_size, budget, max_seqs, caching, abort_rng=None, chunked=True, overlap=False
):
    bm = BlockManager(num_blocks, block_size, caching)
    sched = Scheduler(SchedulerConfig(budget, max_seqs, chunked), bm)
    kv = [[None] * block_size for _ in range(num_blocks)]
    reqs = []
    arrival = 0
    for g, (prompt, max_tokens, n) in enumerate(work):
        leader = None
        for i in range(n):
            params = SamplingParams(max_tokens=max_tokens, n=n)
            r = Request(
                f"{g}#{i}", prompt, params, 0, frozenset(), len(prompt) + max_tokens, arrival, str(g), leader
            )
            leader = leader or (r if caching else None)
            arrival += 1
            reqs.append(r)
            sched.add(r)
    steps = 0
    inflight = None  # overlap: the batch "running on the device" while the next one is scheduled

    def resolve(entry):
        # a slot written from a placeholder holds (writer, position) until the token is known
        if entry is not None and entry[0] == "placeholder":
            writer, p = entry[1], entry[2]
            return (writer.token_ids[p], p) if p < len(writer.token_ids) else entry
        return entry

    def check(batch):
        for s in batch.requests:
            r = s.request
            if r.is_finished or r.status is not RequestStatus.RUNNING:
                continue
            for p in range(min(s.start + s.num_new_tokens, r.num_tokens)):
                assert resolve(kv[r.block_ids[p // block_size]][p % block_size]) == (r.token_ids[p], p), (
                    r.request_id,
                    p,
                )

    def apply(batch):
        for s in batch.requests:
            r = s.request
            if not s.sample:
                continue
            if r.is_finished:
                r.num_pending -= 1
                continue
            r.token_ids.append(next_token(r.token_ids))
            sched.token_appended(r)
            if r.num_tokens >= r.max_total_tokens:
                sched.finish(r, "length")

    while sched.has_unfinished() or inflight is not None:
        steps += 1
        assert steps < 10_000, "no progress"
        batch = sched.schedule()
        assert batch.num_tokens <= budget
        assert len(sched.running) <= max_seqs
        idle = not batch.requests and inflight is None
        assert not idle or not sched.has_unfinished(), "an idle step with work left"
        seen = set()
        for s in batch.requests:
            r = s.request
            assert id(r) not in seen
            seen.add(id(r))
            assert r.status is RequestStatus.RUNNING and s.start == r.num_computed_tokens
            assert len(r.block_ids) * block_size >= s.start + s.num_new_tokens
            assert s.start + s.num_new_tokens <= r.num_tokens + r.num_pending
            for p in range(s.start, s.start + s.num_new_tokens):
                tok = ("placeholder", r, p) if p >= r.num_tokens else (r.token_ids[p], p)
                kv[r.block_ids[p // block_size]][p % block_size] = tok
        sched.update_computed(batch)
        if overlap:
            if inflight is not None:
                check(inflight)
                apply(inflight)
            inflight = batch if batch.requests else None
        else:
            check(batch)
            apply(batch)
        if abort_rng is not None and abort_rng.random() < 0.05:
            live = [r for r in reqs if not r.is_finished]
            if live:
                sched.finish(abort_rng.choice(live), "abort")
        bm.check_invariants([r.block_ids for r in (*sched.running, *sched.waiting)])
    assert bm.num_free_blocks == num_blocks, "blocks leaked"
    return reqs, sched


def expected_output(prompt: list[int], max_tokens: int) -> list[int]:
    toks = list(prompt)
    for _ in range(max_tokens):
        toks.append(next_token(toks))
    return toks[len(prompt) :]


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("seed", range(12))
def test_random_workloads_finish_with_correct_outputs(seed, overlap):
    rng = random.Random(seed)
    work = make_workload(rng, rng.randint(1, 25))
    block_size = rng.choice([1, 2, 4, 8])
    longest = max(len(p) + m for p, m, _ in work)
    num_blocks = -(-longest // block_size) + rng.randint(0, 30)  # tight pools force preemption
    reqs, sched = run(
        work,
        num_blocks=num_blocks,
        block_size=block_size,
        budget=rng.choice([1, 3, 16, 64, 512]),
        max_seqs=rng.choice([1, 2, 8, 64]),
        caching=rng.random() < 0.8,
        chunked=True,
        overlap=overlap,
    )
    i = 0
    for prompt, max_tokens, n in work:
        for _ in range(n):
            assert reqs[i].output_token_ids == expected_output(prompt, max_tokens)
            assert reqs[i].finish_reason == "length"
            i += 1


@pytest.mark.parametrize("overlap", [False, True])
def test_preemption_happens_and_is_harmless(overlap):
    rng = random.Random(99)
    work = [([rng.randrange(50) for _ in range(20)], 30, 1) for _ in range(8)]
    reqs, sched = run(work, num_blocks=14, block_size=4, budget=64, max_seqs=8, caching=True, overlap=overlap)
    assert sched.num_preemptions > 0
    for r, (prompt, max_tokens, _) in zip(reqs, work, strict=True):
        assert r.output_token_ids == expected_output(prompt, max_tokens)


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_random_aborts_leak_nothing(seed, overlap):
    rng = random.Random(100 + seed)
    work = make_workload(rng, 20)
    run(
        work, num_blocks=40, block_size=4, budget=32, max_seqs=8, caching=True, abort_rng=rng, overlap=overlap
    )


@pytest.mark.parametrize("overlap", [False, True])
def test_group_prompt_is_computed_once(overlap):
    prompt = list(range(40))
    work = [(prompt, 5, 8)]
    reqs, sched = run(
        work, num_blocks=200, block_size=4, budget=4096, max_seqs=16, caching=True, overlap=overlap
    )
    # the leader computes 40 prompt tokens; each sibling recomputes only the last block (4 tokens)
    assert sched.num_prompt_tokens_computed == 40 + 7 * 4
    assert all(r.num_cached_tokens == 36 for r in reqs[1:])


def test_no_chunked_prefill_waits_for_budget():
    work = [(list(range(30)), 2, 1)]
    with pytest.raises(AssertionError, match="idle step"):
        run(work, num_blocks=20, block_size=4, budget=16, max_seqs=4, caching=False, chunked=False)
    run(work, num_blocks=20, block_size=4, budget=32, max_seqs=4, caching=False, chunked=False)
