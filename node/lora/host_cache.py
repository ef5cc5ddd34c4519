"""The host-memory tier: parsed adapter weights within a byte budget, scan-resistant; pinned ones are never evicted.

A segmented LRU (SLRU). An adapter enters on probation; once a second request has used it (`use`, one
per request, whether its weights came from here or from a device slot) it is protected. Eviction takes
probation least recently used first, and protected ones only when no probation entry is left, so a
stream of adapters that nobody asks for twice (a payer's cheap requests, or a stranger's chat quotes,
each naming another adapter) evicts only its own kind, never the adapters honest payers keep using.
Protected entries hold at most `PROTECTED_SHARE` of the budget (past it, the least recently used
goes back on probation, as most recently used there), so newcomers always have room to prove themselves.

Not thread-safe on its own: the store calls it under its lock. Eviction only drops this cache's
reference; the memory is freed once the engine drops its own (a device slot holds a copy, not this).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Generic, TypeVar

W = TypeVar("W")
logger = logging.getLogger(__name__)
PROTECTED_SHARE = 0.8


class HostCache(Generic[W]):
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.nbytes = self._protected_bytes = 0
        self._probation: OrderedDict[str, tuple[W, int]] = OrderedDict()  # least recently used first
        self._protected: OrderedDict[str, tuple[W, int]] = OrderedDict()  # used by a second request
        self._used: set[str] = set()  # on probation, used by one request
        self._pinned: set[str] = set()

    def __contains__(self, key: str) -> bool:
        return key in self._probation or key in self._protected

    def __len__(self) -> int:
        return len(self._probation) + len(self._protected)

    def get(self, key: str) -> W | None:
        """The weights, marked most recently used in their segment; None if not resident."""
        for segment in (self._protected, self._probation):
            entry = segment.get(key)
            if entry is not None:
                segment.move_to_end(key)
                return entry[0]
        return None

    def use(self, key: str) -> None:
        """A request used this adapter: the second one protects it (nothing if it is not resident)."""
        if key in self._protected:
            self._protected.move_to_end(key)
        elif key in self._probation and key not in self._used:
            self._used.add(key)
            self._probation.move_to_end(key)
        elif key in self._probation:
            self._used.discard(key)
            entry = self._probation.pop(key)
            self._protected[key] = entry
            self._protected_bytes += entry[1]
            self._demote()

    def put(self, key: str, weights: W, nbytes: int) -> list[str]:
        """Insert on probation as most recently used; returns the keys evicted to stay within budget.

        Unpinned entries go probation first, each segment least recently used first. If the new entry
        still does not fit beside the pinned ones, it is not kept either (an unpinned newcomer never
        pushes the cache over budget); a pinned one is kept and the cache runs over budget with a warning.
        """
        self.pop(key)
        self._probation[key] = (weights, nbytes)
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
        self._used.discard(key)
        entry = self._probation.pop(key, None)
        if entry is None:
            entry = self._protected.pop(key, None)
            if entry is None:
                return False
            self._protected_bytes -= entry[1]
        self.nbytes -= entry[1]
        return True

    def pin(self, key: str) -> None:
        self._pinned.add(key)

    def unpin(self, key: str) -> list[str]:
        """Unpin; returns the keys evicted if pinned entries had pushed the cache over budget."""
        self._pinned.discard(key)
        return self._evict(keep=None)

    def keys(self) -> list[str]:
        """Resident keys in eviction order: probation, then protected, each least recently used first."""
        return [*self._probation, *self._protected]

    def _demote(self) -> None:
        """Protected entries past their share go back on probation, least recently used first."""
        while self._protected_bytes > PROTECTED_SHARE * self.max_bytes and len(self._protected) > 1:
            key, entry = self._protected.popitem(last=False)
            self._protected_bytes -= entry[1]
            self._probation[key] = entry
            self._used.add(key)  # one more request protects it again

    def _evict(self, keep: str | None) -> list[str]:
        evicted: list[str] = []
        for key in self.keys():
            if self.nbytes <= self.max_bytes:
                break
            if key == keep or key in self._pinned:
                continue
            self.pop(key)
            evicted.append(key)
        return evicted
