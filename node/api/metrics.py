"""Prometheus metrics of one API process, on a registry of its own (tests build many apps).

Names follow prometheus-client's conventions: units in the name (`_seconds`, `_bytes`, `_blocks`,
`_units` for the payment token's base units), `_total` on counters, and label sets that stay
bounded: a per-adapter series for the first `max_adapters` adapters this process serves, `other` for
the rest. docs/metrics.md lists every metric (tests/api/test_metrics.py reads that list).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
OTHER = "other"
DEFAULT_MAX_ADAPTERS = 20


class AdapterLabels:
    """The label an adapter's figures go under: its own for the first `max_adapters` adapters served
    (kept for the life of the process, so every series stays monotonic), `other` after that."""

    def __init__(self, max_adapters: int) -> None:
        self.max_adapters = max_adapters
        self._named: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, adapter: str) -> str:
        with self._lock:
            if adapter in self._named:
                return adapter
            if len(self._named) < self.max_adapters:
                self._named.add(adapter)
                return adapter
        return OTHER


class APIMetrics:
    def __init__(self, max_adapters: int = DEFAULT_MAX_ADAPTERS) -> None:
        self.registry = CollectorRegistry()
        self.adapter_label = AdapterLabels(max_adapters)
        r = self.registry
        self.requests = Counter("loranode_requests", "Paid requests answered, by adapter and outcome "
                                "(charged: a receipt; lost: tokens left the node uncharged)",
                                ["adapter", "outcome"], registry=r)
        self.tokens = Counter("loranode_tokens", "Tokens of answered requests, by adapter and kind",
                              ["adapter", "kind"], registry=r)
        self.fees = Counter("loranode_fee_units", "Fees charged, in the payment token's base units",
                            ["adapter"], registry=r)
        self.losses = Counter("loranode_loss_units", "Value served and not charged, in base units",
                              ["adapter", "reason"], registry=r)
        self.receipts = Counter("loranode_receipts", "Receipts signed and committed", registry=r)
        self.latency = Histogram("loranode_request_duration_seconds", "End-to-end latency of paid requests",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("loranode_time_to_first_token_seconds", "Time to the first streamed token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.inter_token = Histogram("loranode_inter_token_latency_seconds",
                                     "Time between streamed chunks of one choice", buckets=TOKEN_GAP_BUCKETS,
                                     registry=r)

    def answered(self, adapter: str, prompt_tokens: int, completion_tokens: int, fee: int) -> None:
        label = self.adapter_label(adapter)
        self.requests.labels(adapter=label, outcome="charged").inc()
        self.tokens.labels(adapter=label, kind="prompt").inc(prompt_tokens)
        self.tokens.labels(adapter=label, kind="completion").inc(completion_tokens)
        self.fees.labels(adapter=label).inc(fee)
        self.receipts.inc()

    def chunk_sent(self, started: float, was_sent: bool, last_at: dict[int, float], index: int) -> None:
        """A stream's chunk of choice `index`: time to the stream's first chunk, and between one choice's chunks."""
        now = time.monotonic()
        if not was_sent:
            self.ttft.observe(now - started)
        if index in last_at:
            self.inter_token.observe(now - last_at[index])
        last_at[index] = now

    def lost(self, adapter: str, completion_tokens: int, amount: int, reason: str) -> None:
        label = self.adapter_label(adapter)
        self.requests.labels(adapter=label, outcome="lost").inc()
        self.tokens.labels(adapter=label, kind="completion").inc(completion_tokens)
        self.losses.labels(adapter=label, reason=reason).inc(amount)

    def add_source(self, collect: Callable[[], Iterable[Metric]]) -> None:
        """Families read at scrape time (engine, adapter tiers, the database's backlog)."""
        self.registry.register(_Source(collect))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Source(Collector):
    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterable[Metric]:
        return self._collect()
