"""Prometheus metrics of one API process, on a registry of its own (tests build many apps)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class APIMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("loranode_requests", "Requests by route and status", ["route", "status"], registry=r)
        self.tokens = Counter("loranode_tokens", "Tokens served by kind", ["kind"], registry=r)
        self.latency = Histogram("loranode_request_seconds", "End-to-end latency of paid requests", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("loranode_time_to_first_token_seconds", "Time to the first streamed token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.receipts = Counter("loranode_receipts", "Receipts signed and committed", registry=r)
        self.fees = Counter("loranode_fees", "Fees charged, in token units", registry=r)
        # One series per adapter this process served: behind the balancer, an adapter's traffic should
        # show on one replica (docs/replicas.md). Its cardinality is the adapters served here.
        self.adapter_requests = Counter("loranode_adapter_requests", "Paid requests answered, by adapter",
                                        ["adapter"], registry=r)

    def add_gauges(self, name: str, doc: str, read: Callable[[], dict[tuple[str, ...], float]],
                   labels: list[str]) -> None:
        """A gauge family read at scrape time (adapter tiers, pending receipts, queue depth)."""
        self.registry.register(_Callback(name, doc, read, labels))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Callback(Collector):
    def __init__(self, name: str, doc: str, read: Callable[[], dict[tuple[str, ...], float]],
                 labels: list[str]) -> None:
        self.name, self.doc, self.read, self.labels = name, doc, read, labels

    def collect(self):  # type: ignore[no-untyped-def]
        family = GaugeMetricFamily(self.name, self.doc, labels=self.labels)
        for values, number in self.read().items():
            family.add_metric(list(values), number)
        yield family
