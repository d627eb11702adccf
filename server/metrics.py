"""The server's Prometheus metrics (GET /metrics): requests by outcome, TTFT and decode time,
tokens reused and recomputed, store hits and misses, the queue, the decoding batch and the KV
bytes its answers hold, and each KV tier's health."""

from __future__ import annotations

from collections.abc import Iterator

from epic_rag.app.answering import AnswerReport
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from epic_rag.scheduler import Scheduler
from epic_rag.store import TieredStore

from .worker import EngineWorker


class Metrics:
    """The server's metrics, in a registry of its own (two apps in one process never share counts)."""

    def __init__(self, worker: EngineWorker) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("epic_rag_requests", "Chat completion requests by outcome", ["status"], registry=r)
        self.errors = Counter("epic_rag_request_errors", "Requests that failed, by error type", ["type"], registry=r)
        self.ttft = Histogram(
            "epic_rag_ttft_seconds",
            "Time to first token",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self.decode = Histogram(
            "epic_rag_decode_seconds",
            "Decoding time per answer",
            buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120),
            registry=r,
        )
        self.reused = Counter("epic_rag_tokens_reused", "Prompt tokens whose KV was linked from the store", registry=r)
        self.recomputed = Counter(
            "epic_rag_tokens_recomputed", "Prompt tokens computed through every layer", registry=r
        )
        self.hits = Counter("epic_rag_store_hits", "Chunk KV entries linked from the store", registry=r)
        self.misses = Counter(
            "epic_rag_store_misses", "Chunk KV entries computed because the store lacked them", registry=r
        )
        self.cancelled = Counter(
            "epic_rag_cancelled", "Answers stopped early because their client went away", registry=r
        )
        self.queue = Gauge("epic_rag_queue_depth", "Requests waiting or running", registry=r)
        self.queue.set_function(lambda: worker.depth)

    def watch_store(self, store: TieredStore) -> None:
        """Export the KV store's tiers (hits served, failures, damaged entries, availability)."""
        self.registry.register(_TierCollector(store))

    def watch_scheduler(self, scheduler: Scheduler) -> None:
        """Export the batching scheduler's state: answers decoding together, the KV they hold."""
        r = self.registry
        batch = Gauge("epic_rag_batch_size", "Answers decoding together now", registry=r)
        batch.set_function(lambda: scheduler.batch_size)
        kv = Gauge(
            "epic_rag_kv_bytes_in_flight",
            "Bytes of KV cache held by the answers decoding and the prompt prefilling",
            registry=r,
        )
        kv.set_function(lambda: scheduler.kv_bytes_in_flight)
        r.register(_SchedulerCollector(scheduler))

    def record(self, report: AnswerReport) -> None:
        """Count what one answer cost, cancelled answers too (what they computed was spent)."""
        if report.finish_reason == "cancelled":
            self.cancelled.inc()
        self.ttft.observe(report.ttft_s)
        self.decode.observe(report.decode_s)
        self.reused.inc(report.tokens_reused)
        self.recomputed.inc(report.tokens_recomputed)
        self.hits.inc(report.cache_hits)
        self.misses.inc(report.cache_misses)

    def outcome(self, status: int, error_type: str | None = None) -> None:
        """Count one request by its HTTP status, and failed ones by their OpenAI error type."""
        if error_type is not None:
            self.errors.labels(error_type).inc()
        self.requests.labels(str(status)).inc()

    def exposition(self) -> tuple[bytes, str]:
        """(the text Prometheus scrapes, its content type)."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _TierCollector(Collector):
    """Per-tier counters of a KV store, read at scrape time (a shared tier's outages show here)."""

    def __init__(self, store: TieredStore) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        hits = CounterMetricFamily("epic_rag_kv_tier_hits", "Store hits served by each KV tier", labels=["tier"])
        errors = CounterMetricFamily(
            "epic_rag_kv_tier_errors", "KV tier operations failed or skipped (tier unreachable)", labels=["tier"]
        )
        damaged = CounterMetricFamily(
            "epic_rag_kv_tier_corrupted", "Damaged KV entries found, deleted and recomputed", labels=["tier"]
        )
        up = GaugeMetricFamily(
            "epic_rag_kv_tier_up", "1 while a KV tier answers, 0 while it is skipped", labels=["tier"]
        )
        served = self.store.hits_by_tier()
        for backend in self.store.backends:
            counters = backend.counters()
            hits.add_metric([backend.name], served.get(backend.name, 0))
            errors.add_metric([backend.name], counters.errors)
            damaged.add_metric([backend.name], counters.corrupted)
            up.add_metric([backend.name], float(getattr(backend, "available", True)))
        yield from (hits, errors, damaged, up)


class _SchedulerCollector(Collector):
    """Batched decode steps and the tokens they produced (their ratio is the mean batch)."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily("epic_rag_decode_steps", "Batched decode steps run", value=self.scheduler.steps)
        yield CounterMetricFamily(
            "epic_rag_decode_step_tokens", "Tokens made by batched decode steps", value=self.scheduler.tokens_stepped
        )
