"""The service's Prometheus metrics (``GET /metrics``, the text exposition format).

One registry per app, not the process-wide default, so two apps in one process (tests) do not
share counts.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """Counters of requests and sentences, requests in progress, batch sizes, queue lengths and
    request latency."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("seq2seq_requests", "HTTP requests answered",
                                ["path", "status"], registry=self.registry)
        self.sentences = Counter("seq2seq_sentences", "sentences translated (non-blank lines)",
                                 ["pair"], registry=self.registry)
        self.batch_size = Histogram("seq2seq_batch_sentences",
                                    "sentences decoded together: per step of a beam search that "
                                    "requests join, per whole decode otherwise", ["pair"],
                                    buckets=BATCH_BUCKETS, registry=self.registry)
        self.latency = Histogram("seq2seq_request_seconds", "time to answer /translate",
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.in_progress = Gauge("seq2seq_requests_in_progress",
                                 "HTTP requests received whose answer has not started", ["path"],
                                 registry=self.registry)
        self.queue = Gauge("seq2seq_queue_sentences", "sentences waiting for a worker",
                           ["pair"], registry=self.registry)

    def watch_queue(self, pair: str, queued: Callable[[], int]) -> None:
        """Report ``queued()`` as the queue length of ``pair`` whenever metrics are read."""
        self.queue.labels(pair=pair).set_function(queued)

    def on_batch(self, pair: str) -> Callable[[int], None]:
        """A callback for a worker: records the sentence count of each search step (or whole
        decode)."""
        return self.batch_size.labels(pair=pair).observe

    def on_translated(self, pair: str) -> Callable[[int], None]:
        """A callback for a worker: counts the sentences it translated."""
        return self.sentences.labels(pair=pair).inc

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
