"""Hundreds of concurrent streaming requests, a third of them dropped by their clients at random
points (before the first token included), bounded in time; afterwards the engine holds no request
and no block, and the finished streams are complete."""

from __future__ import annotations

import asyncio
import json
import random
import time

import httpx

from tests.server.conftest import assert_clean

NUM_REQUESTS = 240
TIME_LIMIT_S = 120.0


async def one(client: httpx.AsyncClient, rng: random.Random, i: int) -> tuple[str, int, int]:
    """Run request ``i``; returns (outcome, tokens expected, tokens received)."""
    max_tokens = rng.randint(2, 12)
    n = rng.choice((1, 1, 2))
    drop_after = rng.choice((None, None, 0, 1, 3))  # events to read before hanging up
    if i % 2:
        path = "/generate"
        body = {
            "prompt_token_ids": [rng.randrange(1, 250) for _ in range(rng.randint(1, 40))],
            "sampling_params": {"max_tokens": max_tokens, "n": n, "ignore_eos": True, "seed": i},
            "stream": True,
        }
    else:
        path = "/v1/completions"
        prompt = "".join(rng.choice("abcdefgh ") for _ in range(rng.randint(1, 40)))
        body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "n": n, "stream": True}
        body["ignore_eos"] = True
    received = 0
    async with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200, await r.aread()
        if drop_after == 0:
            return "dropped", 0, 0
        events = 0
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            outputs = event.get("outputs") or event.get("choices") or []
            received += sum(len(o["token_ids"]) for o in outputs)
            events += 1
            if drop_after is not None and events >= drop_after:
                return "dropped", 0, 0  # leaving the block closes the connection mid-stream
    return "done", max_tokens * n, received


def test_concurrent_streams_with_disconnects(secured):
    rng = random.Random(0)

    async def main():
        limits = httpx.Limits(max_connections=NUM_REQUESTS, max_keepalive_connections=0)
        async with httpx.AsyncClient(
            base_url=secured.url, headers=secured.headers(), limits=limits, timeout=TIME_LIMIT_S
        ) as client:
            return await asyncio.gather(*(one(client, rng, i) for i in range(NUM_REQUESTS)))

    start = time.monotonic()
    results = asyncio.run(asyncio.wait_for(main(), TIME_LIMIT_S))
    elapsed = time.monotonic() - start
    done = [r for r in results if r[0] == "done"]
    dropped = [r for r in results if r[0] == "dropped"]
    assert len(done) + len(dropped) == NUM_REQUESTS and len(dropped) > NUM_REQUESTS // 5
    assert all(expected == got for _, expected, got in done)
    assert_clean(secured)  # zero leaked requests and blocks once the aborts landed
    print(f"{NUM_REQUESTS} streams ({len(dropped)} dropped) in {elapsed:.1f} s")
    # the server kept serving
    assert httpx.get(secured.url + "/health").status_code == 200
