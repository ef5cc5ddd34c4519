"""A single-flight LRU: values loaded once however many ask at once, kept while they cannot change.

The free reads of settled epochs (their parsed trees: settlement/published_trees.py; every payee's earnings
per source: settlement/epoch_sources.py) cost a database read and a parse or a replay each, and strangers may
ask for them at will. Concurrent askers of one key wait for one load (the leader's; the others follow it), at
most `max_loading` keys load at once, and the values are kept least recently used first within `max_size`
(in the units of `size_of`: bytes, entries). A load says whether its value may be kept: a row that changed
while it was read is answered but not remembered; with `max_size` 0 nothing is, and only concurrent askers
share a load (a payer's uncollected total: payment/ledger.py). A failed load is raised to the leader and to
every follower, and the next ask loads again.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class FlightCache(Generic[K, V]):
    def __init__(self, max_size: int, size_of: Callable[[V], int], max_loading: int = 2) -> None:
        self.max_size = max_size
        self.size_of = size_of
        self.size = 0  # of the values kept
        self._entries: OrderedDict[K, V] = OrderedDict()  # least recently used first
        self._loading: dict[K, Future[V]] = {}
        self._lock = threading.Lock()
        self._loaders = threading.BoundedSemaphore(max_loading)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: K, load: Callable[[K], tuple[V, bool]]) -> V:
        """The value of `key`: kept, being loaded by another caller (waited for), or `load(key)` now, which
        gives the value and whether it may be kept."""
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
            pending, is_leader = self._loading.get(key), key not in self._loading
            if pending is None:
                pending = self._loading[key] = Future()
        if not is_leader:
            return pending.result()
        try:
            with self._loaders:
                value, may_keep = load(key)
        except BaseException as exc:
            self._done(key)
            pending.set_exception(exc)
            raise
        if may_keep:
            self._keep(key, value)
        self._done(key)
        pending.set_result(value)
        return value

    def _done(self, key: K) -> None:
        with self._lock:
            del self._loading[key]

    def _keep(self, key: K, value: V) -> None:
        size = self.size_of(value)
        if size > self.max_size:
            return
        with self._lock:
            if key in self._entries:
                return
            self._entries[key] = value
            self.size += size
            while self.size > self.max_size:
                _, dropped = self._entries.popitem(last=False)
                self.size -= self.size_of(dropped)
