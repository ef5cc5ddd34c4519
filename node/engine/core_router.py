"""Which data-parallel engine core serves a request: adapter affinity, bounded by load.

Consistent hashing with bounded loads (Mirrokni, Thorup and Zadimoghaddam, 2018): every core has
`num_virtual` points on a hash ring; a request goes to the first core clockwise from its adapter's
hash whose load after taking it stays within `ceil(load_factor * (total load + 1) / cores up)`. An
adapter's traffic thus stays on the core where its weights are resident, until that core holds more
than its share, and then spills to the next core on the ring (the same one every time, so a hot
adapter is resident on two cores, not on all of them). A core that is down is skipped. Load here is
requests in flight. Not thread-safe: the caller holds its lock around `pick`/`acquire`/`release`.
"""

from __future__ import annotations

import bisect
import hashlib
import math

from node.errors import Unavailable


def _point(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


class CoreRouter:
    def __init__(self, num_cores: int, load_factor: float = 1.25, num_virtual: int = 64) -> None:
        assert num_cores >= 1 and load_factor >= 1.0
        self.num_cores, self.load_factor = num_cores, load_factor
        self.loads = [0] * num_cores
        self.is_up = [True] * num_cores
        ring = sorted((_point(f"core-{core}#{v}"), core) for core in range(num_cores) for v in range(num_virtual))
        self._points = [p for p, _ in ring]
        self._cores = [c for _, c in ring]

    def bound(self) -> int:
        """The most requests a core may hold after taking the next one."""
        up = [core for core in range(self.num_cores) if self.is_up[core]]
        total = sum(self.loads[core] for core in up) + 1
        return math.ceil(self.load_factor * total / max(len(up), 1))

    def pick(self, adapter_id: str | None) -> int:
        """The core for a request of this adapter (None: the least loaded core); Unavailable if none is up."""
        up = [core for core in range(self.num_cores) if self.is_up[core]]
        if not up:
            raise Unavailable("no engine core is running (restarting); retry shortly")
        if adapter_id is None:
            return min(up, key=lambda core: self.loads[core])
        bound = self.bound()
        start = bisect.bisect(self._points, _point(adapter_id))
        for i in range(len(self._cores)):
            core = self._cores[(start + i) % len(self._cores)]
            if self.is_up[core] and self.loads[core] + 1 <= bound:
                return core
        raise AssertionError("some core up is at or below the average load")

    def home(self, adapter_id: str) -> int:
        """The core an adapter goes to while no core is loaded (its place on the ring)."""
        start = bisect.bisect(self._points, _point(adapter_id))
        return self._cores[start % len(self._cores)]

    def acquire(self, core: int) -> None:
        self.loads[core] += 1

    def release(self, core: int) -> None:
        assert self.loads[core] > 0, "released more than acquired"
        self.loads[core] -= 1

    def set_up(self, core: int, is_up: bool) -> None:
        self.is_up[core] = is_up
        if not is_up:
            self.loads[core] = 0  # its requests were failed with it
