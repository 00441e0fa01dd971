"""Prometheus metrics of one server (its own registry, so several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_TOKENS = (64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536)


class Metrics:
    """Requests by route and status, latency, queue wait and depth, batch size, padded and real tokens."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("qembed_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.latency = Histogram("qembed_request_latency_seconds", "request latency", ["route"], registry=r)
        self.queue_wait = Histogram("qembed_queue_wait_seconds", "time from arrival to first batch", ["model"], registry=r)
        self.queue_depth = Gauge("qembed_queue_depth", "inputs waiting for a batch", ["model"], registry=r)
        self.batch_size = Histogram("qembed_batch_size", "inputs per forward pass", ["model"], buckets=_BATCH_SIZES,
                                    registry=r)  # fmt: skip
        self.padded_tokens = Histogram("qembed_batch_padded_tokens", "padded tokens (rows x longest) per forward pass",
                                       ["model"], buckets=_TOKENS, registry=r)  # fmt: skip
        self.forward = Histogram("qembed_forward_seconds", "time of one forward pass", ["model"], registry=r)
        self.tokens = Counter("qembed_tokens", "real tokens processed", ["model"], registry=r)
        self.dropped = Counter("qembed_dropped_inputs", "queued inputs dropped (client gone)", ["model"], registry=r)
        self.in_flight = Gauge("qembed_requests_in_flight", "requests being served", registry=r)
