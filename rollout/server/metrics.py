"""Prometheus metrics of one server: latencies measured where the HTTP layer sees tokens arrive, and
the engine's own counters read from ``AsyncLLM.get_state()`` at scrape time.

Each app has its own ``CollectorRegistry`` (prometheus_client's default registry is module-global).
Names use the ``rollout_`` prefix; counters end in ``_total``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from rollout.outputs import RequestOutput

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                 10.0, 20.0, 40.0, 80.0)  # fmt: skip
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
                0.3, 0.4, 0.5, 0.75, 1.0, 2.5)  # fmt: skip
_E2E_BUCKETS = (0.1, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)


class EngineCollector(Collector):
    """Engine figures from the last ``get_state()`` answer (set by the /metrics route before it
    renders). Nothing is reported while no state was read."""

    def __init__(self) -> None:
        self.state: dict[str, Any] | None = None

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        s = self.state
        if s is None:
            return
        st = s["stats"]
        yield _gauge("rollout_num_requests_running", "Sequences scheduled in the engine", s["num_running"])
        yield _gauge(
            "rollout_num_requests_waiting",
            "Sequences waiting for admission (held while paused included)",
            s["num_waiting"] + s["num_held"],
        )
        used = 1.0 - st["num_free_blocks"] / st["num_blocks"] if st["num_blocks"] else 0.0
        yield _gauge("rollout_kv_cache_usage_ratio", "Fraction of KV cache blocks in use (0-1)", used)
        yield _gauge("rollout_kv_cache_blocks", "KV cache blocks in the pool", st["num_blocks"])
        hit = st["num_cached_tokens"] / st["num_prompt_tokens"] if st["num_prompt_tokens"] else 0.0
        yield _gauge(
            "rollout_prefix_cache_hit_ratio",
            "Prompt tokens served by the prefix cache / prompt tokens submitted, since start",
            hit,
        )
        yield _counter(
            "rollout_prefix_cache_hit_tokens",
            "Prompt tokens served by the prefix cache",
            st["num_cached_tokens"],
        )
        yield _counter("rollout_prompt_tokens_submitted", "Prompt tokens submitted", st["num_prompt_tokens"])
        yield _counter(
            "rollout_prompt_tokens_computed",
            "Prompt tokens run through the model",
            st["num_prompt_tokens_computed"],
        )
        yield _counter("rollout_generation_tokens", "Tokens sampled by the engine", st["num_output_tokens"])
        yield _counter(
            "rollout_num_preemptions", "Sequences preempted (freed and recomputed)", st["num_preemptions"]
        )
        yield _gauge("rollout_weight_version", "Weight version the engine runs", s["weight_version"])
        state = GaugeMetricFamily(
            "rollout_engine_state", "Engine state (1 for the current one)", labels=["state"]
        )
        state.add_metric([str(s["state"])], 1.0)
        yield state


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=float(value))


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=float(value))


class ServerMetrics:
    """The server's metrics. ``observe`` is called with every output a request streams."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.ttft = Histogram(
            "rollout_time_to_first_token_seconds",
            "From the request's arrival to its first generated token",
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "rollout_inter_token_latency_seconds",
            "Time between streamed outputs of a request, divided by the tokens they carried",
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "rollout_e2e_request_latency_seconds", "Request latency", buckets=_E2E_BUCKETS, registry=r
        )
        self.in_flight = Gauge(
            "rollout_http_requests_in_flight", "Prompts being generated for HTTP clients", registry=r
        )
        self.prompt_tokens = Counter(
            "rollout_http_prompt_tokens", "Prompt tokens of HTTP requests", registry=r
        )
        self.generation_tokens = Counter(
            "rollout_http_generation_tokens", "Tokens generated for HTTP requests", registry=r
        )
        self.finished = Counter(
            "rollout_request_finished", "Samples finished, by finish reason", ["finish_reason"], registry=r
        )
        self.engine = EngineCollector()
        r.register(self.engine)

    def observe(self, out: RequestOutput, now: float, start: float, last: float | None) -> float | None:
        """Record one delta output of a request that started at ``start`` and last carried tokens at
        ``last``; returns the new ``last``."""
        new = 0
        total = 0
        for c in out.outputs:
            k = len(c.token_ids)
            total += k
            new = max(new, k)
            if c.finish_reason is not None:
                self.finished.labels(c.finish_reason).inc()
        if not new:
            return last
        self.generation_tokens.inc(total)
        if last is None:
            self.ttft.observe(now - start)
        else:
            self.itl.observe((now - last) / new)
        return now

    def render(self, state: dict[str, Any] | None) -> bytes:
        """The exposition text, with the engine's figures from ``state`` (None: engine figures left out)."""
        self.engine.state = state
        return generate_latest(self.registry)
