"""The host-memory tier: parsed adapter weights in an LRU bounded in bytes; pinned ones are never evicted.

Not thread-safe on its own: the store calls it under its lock. Eviction only drops this cache's
reference; the memory is freed once the engine drops its own (a device slot holds a copy, not this).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Generic, TypeVar

W = TypeVar("W")
logger = logging.getLogger(__name__)


class HostCache(Generic[W]):
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._entries: OrderedDict[str, tuple[W, int]] = OrderedDict()  # least recently used first
        self._pinned: set[str] = set()

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> W | None:
        """The weights, marked most recently used; None if not resident."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def put(self, key: str, weights: W, nbytes: int) -> list[str]:
        """Insert as most recently used; returns the keys evicted to stay within budget.

        Unpinned entries go least recently used first. If the new entry still does not fit beside
        the pinned ones, it is not kept either (an unpinned newcomer never pushes the cache over
        budget); a pinned one is kept and the cache runs over budget with a warning.
        """
        self.pop(key)
        self._entries[key] = (weights, nbytes)
        self.nbytes += nbytes
        evicted = self._evict(keep=key)
        if self.nbytes > self.max_bytes and key not in self._pinned:
            self.pop(key)
            evicted.append(key)
        elif self.nbytes > self.max_bytes:
            logger.warning("pinned adapters hold %d bytes, over the %d-byte host budget",
                           self.nbytes, self.max_bytes)
        return evicted

    def pop(self, key: str) -> bool:
        entry = self._entries.pop(key, None)
        if entry is None:
            return False
        self.nbytes -= entry[1]
        return True

    def pin(self, key: str) -> None:
        self._pinned.add(key)

    def unpin(self, key: str) -> list[str]:
        """Unpin; returns the keys evicted if pinned entries had pushed the cache over budget."""
        self._pinned.discard(key)
        return self._evict(keep=None)

    def keys(self) -> list[str]:
        """Resident keys, least recently used first."""
        return list(self._entries)

    def _evict(self, keep: str | None) -> list[str]:
        evicted: list[str] = []
        if self.nbytes <= self.max_bytes:
            return evicted
        for key in list(self._entries):
            if key == keep or key in self._pinned:
                continue
            self.pop(key)
            evicted.append(key)
            if self.nbytes <= self.max_bytes:
                break
        return evicted
