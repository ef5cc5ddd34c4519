"""What the store reports per tier: hits and misses, load times, bytes, evictions (a frozen snapshot).

Per tier:
- host: a hit is a get/prefetch answered from host memory, a miss one that started a load (joining
  a load already running, or getting a recent failure back, counts as neither; poll with `state`,
  which counts nothing); `nbytes` is the bytes resident now; no loads of its own.
- disk: a hit is a load that found a good copy in the disk cache, a miss one that had to go to the
  source (a copy that no longer hashes right counts as a miss and is deleted); loads time the step
  from the disk copy to parsed weights in host memory (hash check + parse); `nbytes` is the bytes
  cached now.
- source: a hit is a fetch that succeeded, a miss one that failed; loads time the fetch into the disk
  cache (download or copy, hashed while written); `nbytes` is the bytes fetched since start.
"""

from __future__ import annotations

import statistics
import threading
from collections import deque
from dataclasses import asdict, dataclass

TIERS = ("host", "disk", "source")


@dataclass(frozen=True)
class TierMetrics:
    hits: int
    misses: int
    evictions: int
    nbytes: int
    num_loads: int
    load_seconds_sum: float
    recent_load_seconds: tuple[float, ...]  # the last few loads, oldest first

    @property
    def hit_rate(self) -> float | None:
        total = self.hits + self.misses
        return self.hits / total if total else None

    @property
    def p50_load_seconds(self) -> float | None:
        return statistics.median(self.recent_load_seconds) if self.recent_load_seconds else None


@dataclass(frozen=True)
class StoreMetrics:
    host: TierMetrics
    disk: TierMetrics
    source: TierMetrics
    num_registered: int
    num_pinned: int
    num_loading: int
    num_failed: int

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = asdict(self)
        for tier in TIERS:
            metrics: TierMetrics = getattr(self, tier)
            out[tier] = {**asdict(metrics), "hit_rate": metrics.hit_rate,
                         "p50_load_seconds": metrics.p50_load_seconds}
        return out


class MetricsRecorder:
    """Thread-safe counters behind `StoreMetrics`; recent samples are bounded (memory stays flat)."""

    def __init__(self, num_recent_samples: int) -> None:
        self._lock = threading.Lock()
        self._counts = {tier: {"hits": 0, "misses": 0, "evictions": 0, "num_loads": 0} for tier in TIERS}
        self._seconds = dict.fromkeys(TIERS, 0.0)
        self._recent = {tier: deque[float](maxlen=num_recent_samples) for tier in TIERS}
        self._fetched_bytes = 0

    def count(self, tier: str, what: str, n: int = 1) -> None:
        with self._lock:
            self._counts[tier][what] += n

    def loaded(self, tier: str, seconds: float, fetched_bytes: int = 0) -> None:
        with self._lock:
            self._counts[tier]["num_loads"] += 1
            self._seconds[tier] += seconds
            self._recent[tier].append(seconds)
            self._fetched_bytes += fetched_bytes

    def tier(self, tier: str, nbytes: int | None = None) -> TierMetrics:
        with self._lock:
            c = self._counts[tier]
            return TierMetrics(hits=c["hits"], misses=c["misses"], evictions=c["evictions"],
                               nbytes=self._fetched_bytes if nbytes is None else nbytes,
                               num_loads=c["num_loads"], load_seconds_sum=self._seconds[tier],
                               recent_load_seconds=tuple(self._recent[tier]))
