"""``GET /metrics``: Prometheus metrics, with the official client library (``prometheus_client``).

Two kinds. Observed as requests run (histograms and counters the endpoints update): time to first token,
inter-token latency, prompt and generated tokens, finished requests by finish reason. Read from the engine at
scrape time (a custom collector, so a scrape shows the state of that moment and nothing is updated per step):
requests running and waiting, KV cache used / free / total (pages, or slots for the continuous strategy),
and the prefix cache's queries, hits and hit rate (prompt tokens).

Each server has its own registry, so several servers in one process (tests) do not collide in the global one.
"""
from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..engine import LLMEngine

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: How a choice can end: the model's or a stop string's stop, the length limit, cancelled (the client left, the
#: server shut down), or the engine failed.
FINISH_REASONS = ("stop", "length", "abort", "error")

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0)


class EngineCollector(Collector):
    """The engine's state at scrape time: the scheduler's queues and the KV cache."""

    def __init__(self, engine: LLMEngine, model: str):
        self.engine = engine
        self.model = model

    def collect(self) -> Iterator[Metric]:
        scheduler = self.engine.scheduler
        labels = ["model"]
        for name, help_text, value in (
                ("ember_requests_running", "Requests being computed (holding KV cache)", len(scheduler.running)),
                ("ember_requests_waiting", "Requests queued for KV cache room or a batch place", len(scheduler.waiting))):
            gauge = GaugeMetricFamily(name, help_text, labels=labels)
            gauge.add_metric([self.model], value)
            yield gauge
        usage = self.engine.kv_cache_usage()
        unit = str(usage["unit"])
        for key, help_text in (("used", "held by requests"), ("free", "an allocation can take now"),
                               ("total", "in the KV cache")):
            gauge = GaugeMetricFamily(f"ember_kv_cache_pages_{key}", f"KV cache pages (slots for the continuous "
                                      f"strategy, see the unit label) {help_text}", labels=["model", "unit"])
            gauge.add_metric([self.model, unit], float(usage[key]))
            yield gauge
        queries, hits = int(usage["prefix_cache_queries"]), int(usage["prefix_cache_hits"])
        for name, help_text, value in (("ember_prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                        queries),
                                       ("ember_prefix_cache_hits", "Prompt tokens served from the prefix cache",
                                        hits)):
            counter = CounterMetricFamily(name, help_text, labels=labels)
            counter.add_metric([self.model], value)
            yield counter
        rate = GaugeMetricFamily("ember_prefix_cache_hit_rate", "Share of prompt tokens served from the prefix "
                                 "cache since the model was loaded", labels=labels)
        rate.add_metric([self.model], hits / queries if queries else 0.0)
        yield rate


class ServerMetrics:
    """The server's registry and the metrics the endpoints observe."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ["model"]
        self.time_to_first_token = Histogram(
            "ember_time_to_first_token_seconds", "From the request's arrival to its first generated token",
            labels, buckets=_TTFT_BUCKETS, registry=self.registry)
        self.inter_token_latency = Histogram(
            "ember_inter_token_latency_seconds", "Between consecutive generated tokens of one choice",
            labels, buckets=_ITL_BUCKETS, registry=self.registry)
        self.prompt_tokens = Counter("ember_prompt_tokens", "Prompt tokens of accepted requests, once per prompt (tokens in)",
                                     labels, registry=self.registry)
        self.generation_tokens = Counter("ember_generation_tokens", "Generated tokens (tokens out)",
                                         labels, registry=self.registry)
        self.finished = Counter("ember_requests_finished", "Choices finished, by finish reason (stop, length, "
                                "abort: the client left or the server shut down, error)",
                                labels + ["finish_reason"], registry=self.registry)
        self.embedded_tokens = Counter("ember_embedding_tokens", "Tokens of embedded inputs",
                                       labels, registry=self.registry)

    def watch(self, engine: LLMEngine, model: str) -> None:
        """Report ``engine``'s queues and KV cache at every scrape, and the text model's series from 0 on (a
        series Prometheus first sees mid-run has no starting point for ``rate()``)."""
        self.registry.register(EngineCollector(engine, model))
        for metric in (self.time_to_first_token, self.inter_token_latency, self.prompt_tokens,
                       self.generation_tokens):
            metric.labels(model)
        for reason in FINISH_REASONS:
            self.finished.labels(model, reason)

    def render(self) -> bytes:
        return generate_latest(self.registry)
