"""The families /metrics reads at scrape time: the engine's own figures (in this process or summed
over its core processes), the adapter tiers from the device down to the source, and the backlog the
database holds (settlement, indexer, transaction manager). The backlog grows with the node's history
(every receipt, every transaction sent) and /metrics is free to anyone: it is read at most once per
`BacklogReader.max_age_s`, whoever scrapes, and a scrape that finds a read under way gets the last one."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from node.db.backlog import Backlog, read_backlog

log = logging.getLogger(__name__)
Figures = Callable[[], dict[str, float]]
Tiers = Callable[[], dict[str, dict[str, float]]]
TIERS = ("device", "host", "disk", "source")
# stat the store (or the device slots) reports -> (metric, is a counter, help)
TIER_STATS = {
    "hits": ("loranode_adapter_tier_hits", True, "Adapter lookups answered by the tier"),
    "misses": ("loranode_adapter_tier_misses", True, "Adapter lookups the tier could not answer"),
    "num_loads": ("loranode_adapter_tier_loads", True, "Adapters loaded into the tier"),
    "evictions": ("loranode_adapter_tier_evictions", True, "Adapters pushed out of the tier"),
    "nbytes": ("loranode_adapter_tier_bytes", False,
               "Bytes the tier holds now (source: bytes fetched since start)"),
}


def engine_families(read: Figures) -> Iterator[Metric]:
    """Every engine figure as `loranode_engine_<name>`: a counter when its name ends in `_total`."""
    for name, value in sorted(read().items()):
        if name.endswith("_total"):
            yield CounterMetricFamily(f"loranode_engine_{name.removesuffix('_total')}", name, value=value)
        else:
            yield GaugeMetricFamily(f"loranode_engine_{name}", name, value=value)


def tier_families(read: Tiers) -> Iterator[Metric]:
    snapshot = read()
    for stat, (name, is_counter, doc) in TIER_STATS.items():
        family: Metric = (CounterMetricFamily if is_counter else GaugeMetricFamily)(name, doc, labels=["tier"])
        for tier in TIERS:
            value = snapshot.get(tier, {}).get(stat)
            if value is not None:
                family.add_metric([tier], value)  # type: ignore[attr-defined]
        yield family


@dataclass
class BacklogReader:
    """The node's backlog as the database says, read at most once per `max_age_s`: a scrape that finds a
    read under way answers with the last one (only the first scrapes ever wait for one). None when the
    database did not answer: /ready says so, and a scrape must not fail for it."""

    db: sessionmaker[Session]
    node: str
    max_age_s: float = 10.0
    _reading: threading.Lock = field(default_factory=threading.Lock)
    _last: tuple[float, Backlog | None] | None = None  # (read at, monotonic; what it read)

    def __call__(self) -> Backlog | None:
        last = self._last
        if last is not None and time.monotonic() - last[0] < self.max_age_s:
            return last[1]
        if not self._reading.acquire(blocking=last is None):
            assert last is not None
            return last[1]
        try:
            last = self._last  # read by another scrape while this one waited
            if last is None or time.monotonic() - last[0] >= self.max_age_s:
                last = self._last = (time.monotonic(), self._read())
            return last[1]
        finally:
            self._reading.release()

    def _read(self) -> Backlog | None:
        try:
            with self.db() as session:
                return read_backlog(session, self.node)
        except SQLAlchemyError as e:
            log.warning("metrics: the database did not answer (%s)", type(e).__name__)
            return None


def backlog_families(read: Callable[[], Backlog | None]) -> Iterator[Metric]:
    """The backlog's figures; nothing when the database did not answer."""
    b = read()
    if b is None:
        return
    yield GaugeMetricFamily("loranode_settlement_epoch_lag", "Epochs with receipts that are not final yet",
                            value=b.num_unsettled_epochs)
    yield GaugeMetricFamily("loranode_settlement_failed_epochs", "Epochs whose settlement failed",
                            value=b.num_failed_epochs)
    yield GaugeMetricFamily("loranode_settlement_pending_receipts", "Receipts in no final epoch",
                            value=b.num_pending_receipts)
    yield GaugeMetricFamily("loranode_settlement_unsettled_units",
                            "Fees of receipts in no final epoch, in base units", value=b.unsettled_value)
    if b.indexer_lag_blocks is not None:
        yield GaugeMetricFamily("loranode_indexer_lag_blocks", "Chain head minus the last indexed block",
                                value=b.indexer_lag_blocks)
    if b.indexer_step_age_s is not None:
        yield GaugeMetricFamily("loranode_indexer_last_step_age_seconds",
                                "Seconds since the indexer last reached the chain", value=b.indexer_step_age_s)
    yield GaugeMetricFamily("loranode_tx_pending", "Transactions broadcast and not mined yet", value=b.num_pending_txs)
    yield CounterMetricFamily("loranode_tx_fee_bumps", "Replacement attempts at a higher fee",
                              value=b.num_fee_bumps)


def gauge(name: str, doc: str, read: Callable[[], float]) -> Callable[[], Iterator[Metric]]:
    def collect() -> Iterator[Metric]:
        yield GaugeMetricFamily(name, doc, value=read())
    return collect
