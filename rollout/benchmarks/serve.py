"""What the HTTP layer costs: W1 (BENCHMARKS.md) through the offline ``LLM``, through ``AsyncLLM``
streams (the engine core process, no HTTP), and through ``rollout serve`` (streamed
/v1/completions and streamed /generate, 256 concurrent clients), each phase in its own process.

    python -m rollout.benchmarks.serve --model qwen3-0.6b --out $OUT

Throughput = output tokens / wall time of the whole workload (warm-up excluded). TTFT is from
submitting a request to its first token; ITL is a request's time from its first to its last token
divided by the tokens after the first, percentiles over requests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rollout.benchmarks.workloads import Workload, w1


def _percentiles(xs: list[float]) -> dict[str, float]:
    if not xs:
        return {}
    xs = sorted(xs)
    pick = lambda q: xs[min(len(xs) - 1, int(q * len(xs)))]
    return {"p50_ms": pick(0.5) * 1e3, "p90_ms": pick(0.9) * 1e3, "p99_ms": pick(0.99) * 1e3}


class Timing:
    """Per-request arrival times of streamed tokens."""

    def __init__(self) -> None:
        self.requests: list[_Req] = []
        self.tokens = 0

    def request(self) -> _Req:
        req = _Req(self)
        self.requests.append(req)
        return req

    def summary(self, seconds: float) -> dict[str, Any]:
        done = [r for r in self.requests if r.first is not None]
        return {
            "seconds": seconds,
            "out_tokens": self.tokens,
            "out_tok_s": self.tokens / seconds,
            "ttft": _percentiles([r.first - r.start for r in done]),
            # per request: (last token - first token) / tokens after the first; percentiles over
            # requests (timing single SSE events would read 0 for events that arrive in one chunk)
            "itl": _percentiles([(r.last - r.first) / (r.n - r.n_first) for r in done if r.n > r.n_first]),
        }


class _Req:
    def __init__(self, timing: Timing) -> None:
        self.timing, self.start = timing, time.perf_counter()
        self.first: float | None = None
        self.last = 0.0
        self.n = self.n_first = 0

    def got(self, n: int) -> None:
        if not n:
            return
        now = time.perf_counter()
        if self.first is None:
            self.first, self.n_first = now, n
        self.last = now
        self.n += n
        self.timing.tokens += n


def workload(num_prompts: int | None, max_tokens_cap: int | None) -> Workload:
    """W1, or its first ``num_prompts`` with outputs capped (smoke runs on a CPU)."""
    work = w1()
    k = num_prompts or len(work.prompts)
    cap = max_tokens_cap or max(work.max_tokens)
    # smoke runs: short prompts of byte ids (any vocabulary has them)
    prompts = [[t % 256 for t in p[: cap * 4]] if max_tokens_cap else p for p in work.prompts[:k]]
    return Workload(work.name, prompts, [min(m, cap) for m in work.max_tokens[:k]], work.temperature)


def phase_offline(model: str, work: Workload) -> dict[str, Any]:
    from rollout import LLM, SamplingParams

    llm = LLM(model, load_format="dummy")
    llm.generate(work.prompts[:8], SamplingParams(max_tokens=16, ignore_eos=True), use_tqdm=False)
    params = [
        SamplingParams(max_tokens=m, temperature=work.temperature, ignore_eos=True, seed=i)
        for i, m in enumerate(work.max_tokens)
    ]
    t = time.perf_counter()
    outs = llm.generate(work.prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - t
    ntok = sum(len(c.token_ids) for o in outs for c in o.outputs)
    return {"seconds": seconds, "out_tokens": ntok, "out_tok_s": ntok / seconds}


def phase_async(model: str, work: Workload) -> dict[str, Any]:
    from rollout import AsyncLLM, SamplingParams

    async def run(llm: AsyncLLM) -> dict[str, Any]:
        async def one(i: int, timing: Timing, prompt: list[int], params: SamplingParams) -> None:
            req = timing.request()
            async for out in llm.generate(prompt, params, f"r{i}-{id(timing)}", output_kind="delta"):
                req.got(max((len(c.token_ids) for c in out.outputs), default=0))

        warm = Timing()
        warm_params = SamplingParams(max_tokens=16, ignore_eos=True)
        await asyncio.gather(*(one(i, warm, p, warm_params) for i, p in enumerate(work.prompts[:8])))
        timing = Timing()
        t = time.perf_counter()
        await asyncio.gather(
            *(
                one(
                    i,
                    timing,
                    p,
                    SamplingParams(max_tokens=m, temperature=work.temperature, ignore_eos=True, seed=i),
                )
                for i, (p, m) in enumerate(zip(work.prompts, work.max_tokens, strict=True))
            )
        )
        return timing.summary(time.perf_counter() - t)

    with AsyncLLM(model, load_format="dummy") as llm:
        return asyncio.run(run(llm))


async def _http_run(
    url: str, route: str, work: Any, n: int | None = None, rate: float | None = None
) -> dict[str, Any]:
    """All (or the first ``n``) prompts of ``work`` through ``route``, streamed: at once, or with
    Poisson arrivals at ``rate`` requests/s (TTFT then starts at each request's arrival)."""
    import random

    import httpx

    prompts = work.prompts if n is None else work.prompts[:n]

    def body(i: int, prompt: list[int], max_tokens: int) -> dict[str, Any]:
        if route == "/generate":
            params = {
                "max_tokens": max_tokens,
                "temperature": work.temperature,
                "ignore_eos": True,
                "seed": i,
                "detokenize": False,  # an RL client: token ids in and out
            }
            return {"prompt_token_ids": prompt, "sampling_params": params, "stream": True}
        return {
            "model": "bench",
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": work.temperature,
            "ignore_eos": True,
            "seed": i,
            "stream": True,
        }

    rng = random.Random(0)
    arrivals, t_next = [], 0.0
    for _ in prompts:
        arrivals.append(t_next)
        t_next += rng.expovariate(rate) if rate else 0.0

    async def one(
        client: httpx.AsyncClient, timing: Timing, i: int, prompt: list[int], max_tokens: int
    ) -> None:
        if arrivals[i]:
            await asyncio.sleep(arrivals[i])
        req = timing.request()
        async with client.stream("POST", route, json=body(i, prompt, max_tokens)) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    event = json.loads(line[6:])
                    outs = event.get("outputs") or event.get("choices") or []
                    req.got(sum(len(o["token_ids"]) for o in outs))

    limits = httpx.Limits(max_connections=1024, max_keepalive_connections=1024)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=3600.0) as client:
        timing = Timing()
        max_tokens = work.max_tokens if n is None else [16] * n
        t = time.perf_counter()
        await asyncio.gather(
            *(one(client, timing, i, p, m) for i, (p, m) in enumerate(zip(prompts, max_tokens, strict=True)))
        )
        return timing.summary(time.perf_counter() - t)


def phase_http(model: str, work: Workload, log: Path, rates: list[float]) -> dict[str, Any]:
    import httpx

    cmd = [sys.executable, "-m", "rollout.cli", "serve", model, "--load-format", "dummy", "--port", "0"]
    cmd += ["--served-model-name", "bench"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = ""
        deadline = time.monotonic() + 300
        while not url:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start:\n{log.read_text()[-3000:]}")
            for line in log.read_text().splitlines():
                if line.startswith("rollout serve: listening on "):
                    url = line.rsplit(" ", 1)[1]
            time.sleep(0.2)
        while httpx.get(url + "/health", timeout=30).status_code != 200:
            time.sleep(0.2)
        asyncio.run(_http_run(url, "/v1/completions", work, n=8))  # warm-up
        results = {
            "openai_stream": asyncio.run(_http_run(url, "/v1/completions", work)),
            "generate_stream": asyncio.run(_http_run(url, "/generate", work)),
        }
        for rate in rates:
            run = _http_run(url, "/v1/completions", work, rate=rate)
            results[f"openai_stream_rate{rate:g}"] = asyncio.run(run)
        results["metrics_sample"] = [
            line for line in httpx.get(url + "/metrics").text.splitlines() if line.startswith("rollout_")
        ][:60]
        return results
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="rollout bench serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="qwen3-0.6b")
    p.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    p.add_argument("--phases", nargs="+", default=["offline", "async", "http"])
    p.add_argument("--phase", default=None, help=argparse.SUPPRESS)  # run one phase here (subprocess)
    p.add_argument("--timeout", type=float, default=400.0, help="per phase")
    p.add_argument("--num-prompts", type=int, default=None, help="first N prompts of W1 (smoke runs)")
    p.add_argument("--max-tokens-cap", type=int, default=None, help="cap outputs (smoke runs)")
    p.add_argument("--rates", type=float, nargs="*", default=[], help="also /v1/completions at these req/s")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.phase is not None:
        work = workload(args.num_prompts, args.max_tokens_cap)
        fn = {"offline": phase_offline, "async": phase_async}.get(args.phase)
        log = out / "serve_server.log"
        result = fn(args.model, work) if fn else phase_http(args.model, work, log, args.rates)
        (out / f"serve_{args.phase}.json").write_text(json.dumps(result, indent=1))
        return
    results: dict[str, Any] = {}
    for phase in args.phases:
        cmd = [sys.executable, "-m", "rollout.benchmarks.serve", "--phase", phase, "--model", args.model]
        cmd += ["--out", str(out)]
        for flag, value in (("--num-prompts", args.num_prompts), ("--max-tokens-cap", args.max_tokens_cap)):
            cmd += [flag, str(value)] if value else []
        cmd += ["--rates", *map(str, args.rates)] if args.rates else []
        try:
            subprocess.run(cmd, timeout=args.timeout, check=True)
            results[phase] = json.loads((out / f"serve_{phase}.json").read_text())
        except (subprocess.SubprocessError, OSError) as e:
            results[phase] = {"error": repr(e)}
        print(f"{phase}: {json.dumps(results[phase])[:600]}", flush=True)
    (out / "serve.json").write_text(json.dumps(results, indent=1))
    rows = [("offline LLM", results.get("offline", {})), ("AsyncLLM streams", results.get("async", {}))]
    http = results.get("http", {})
    rows += [("HTTP /v1/completions stream", http.get("openai_stream", {}))]
    rows += [("HTTP /generate stream", http.get("generate_stream", {}))]
    rows += [(f"HTTP /v1/completions @{r:g}/s", http.get(f"openai_stream_rate{r:g}", {})) for r in args.rates]
    base = results.get("offline", {}).get("out_tok_s")
    print(
        f"{'path':30s} {'tok/s':>9s} {'vs LLM':>7s} {'TTFT p50/p90/p99 ms':>22s} {'ITL p50/p90/p99 ms':>20s}"
    )
    for name, r in rows:
        if "out_tok_s" not in r:
            print(f"{name:30s} {r.get('error', 'n/a')}")
            continue
        ratio = f"{r['out_tok_s'] / base:.3f}" if base else "-"
        ttft = "/".join(f"{v:.0f}" for v in r.get("ttft", {}).values()) or "-"
        itl = "/".join(f"{v:.1f}" for v in r.get("itl", {}).values()) or "-"
        print(f"{name:30s} {r['out_tok_s']:9.0f} {ratio:>7s} {ttft:>22s} {itl:>20s}")


if __name__ == "__main__":
    main()
