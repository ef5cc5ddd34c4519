"""Method 2 on a node: the attribution of each output, computed after generation and before the
receipt is committed, from span indexes that are built in the background.

`attribute(datasets, lineage_bps, text)` never waits for an index: while one of the lineage's
datasets has no index yet (or its fetch failed), it schedules the build and answers None, and that
receipt is signed with method 1 (the lineage weights), which is what it then truly says.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from node.attribution.evidence import Attribution, attribute
from node.attribution.index_store import DatasetRef, IndexStore
from node.attribution.rule import CURRENT_RULE, Rule
from node.attribution.span_index import SpanIndex
from node.errors import NodeError

log = logging.getLogger(__name__)
RETRY_FAILED_S = 60.0


class Attributor:
    def __init__(self, store: IndexStore, rule: Rule = CURRENT_RULE) -> None:
        self.store = store
        self.rule = rule
        self._ready: dict[int, SpanIndex] = {}
        self._builds: dict[int, Future[SpanIndex]] = {}
        self._failed_at: dict[int, float] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="span-index")

    def attribute(self, datasets: Sequence[DatasetRef], lineage_bps: Sequence[int], text: str) -> Attribution | None:
        """The output's attribution, or None while an index of the lineage is not ready."""
        indexes = {d.dataset_id: self._ready.get(d.dataset_id) for d in datasets}
        missing = [d for d in datasets if indexes[d.dataset_id] is None]
        if missing:
            self.prepare(missing)
            return None
        return attribute(text, [d.dataset_id for d in datasets], lineage_bps,
                         {k: v for k, v in indexes.items() if v is not None}, self.store.tokenizer,
                         self.store.tokenizer_id, self.rule)

    def prepare(self, datasets: Sequence[DatasetRef]) -> list[Future[SpanIndex]]:
        """Schedule the indexes not yet loaded (one build at a time); the futures of every one pending."""
        futures = []
        with self._lock:
            for d in datasets:
                if d.dataset_id in self._ready:
                    continue
                future = self._builds.get(d.dataset_id)
                failed = self._failed_at.get(d.dataset_id)
                if future is None and (failed is None or time.monotonic() - failed > RETRY_FAILED_S):
                    future = self._pool.submit(self._load, d)
                    self._builds[d.dataset_id] = future
                if future is not None:
                    futures.append(future)
        return futures

    def wait(self, datasets: Sequence[DatasetRef], timeout_s: float) -> bool:
        """Prepare and block until every index of `datasets` is ready (start-up, tests)."""
        deadline = time.monotonic() + timeout_s
        for future in self.prepare(datasets):
            try:
                future.result(timeout=max(deadline - time.monotonic(), 0.0))
            except (TimeoutError, NodeError, OSError):
                return False
        return all(d.dataset_id in self._ready for d in datasets)

    def _load(self, dataset: DatasetRef) -> SpanIndex:
        try:
            index = self.store.get(dataset)
        except (NodeError, OSError) as exc:
            log.warning("no span index for dataset %d (%s): its receipts use method 1", dataset.dataset_id, exc)
            with self._lock:
                self._failed_at[dataset.dataset_id] = time.monotonic()
                self._builds.pop(dataset.dataset_id, None)
            raise
        with self._lock:
            self._ready[dataset.dataset_id] = index
            self._builds.pop(dataset.dataset_id, None)
        return index

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
