"""Prometheus metrics of one server (its own registry, so several servers in one process do not collide)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Latency buckets in seconds: from a fast GPU decode step (ms) to a long CPU prefill (tens of seconds).
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class ServerMetrics:
    """Counters and histograms updated by the handlers and the worker; gauges read the pool when scraped."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("duoattn_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("duoattn_prompt_tokens", "prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("duoattn_generation_tokens", "tokens generated", registry=r)
        self.cancelled = Counter("duoattn_cancelled_requests",
                                 "requests ended early: the client went away or a stop sequence appeared", registry=r)
        self.time_to_first_token = Histogram(
            "duoattn_time_to_first_token_seconds",
            "from a request's arrival (its wait for memory included) to its first token", buckets=TTFT_BUCKETS,
            registry=r)
        self.inter_token_latency = Histogram("duoattn_inter_token_latency_seconds",
                                             "between two tokens of one request", buckets=ITL_BUCKETS, registry=r)
        self.queue_length = Gauge("duoattn_queue_length", "requests waiting for KV memory or a batch slot",
                                  registry=r)
        self.running = Gauge("duoattn_running_requests", "requests holding KV memory", registry=r)
        self.kv_in_use = Gauge("duoattn_kv_bytes_in_use", "KV-cache bytes reserved by running requests", registry=r)
        self.kv_capacity = Gauge("duoattn_kv_bytes_capacity", "KV-cache bytes of the pool", registry=r)

    def watch(self, queue_length: Callable[[], float], running: Callable[[], float], kv_in_use: Callable[[], float],
              kv_capacity: Callable[[], float]) -> None:
        """Read the gauges from these functions at every scrape."""
        self.queue_length.set_function(queue_length)
        self.running.set_function(running)
        self.kv_in_use.set_function(kv_in_use)
        self.kv_capacity.set_function(kv_capacity)

    def render(self) -> bytes:
        return generate_latest(self.registry)
