"""Which data-parallel engine core serves a request: balanced by queued work, kept where its adapter is warm.

Load is work, not requests: a core's load is the tokens it has queued, prompt plus `max_tokens` of
every request in flight on it (a request of 2,000 tokens weighs what 60 short ones do). Locality pays
only where it saves an adapter load, so the bound a core may hold depends on whether taking the request
elsewhere would cost one. Every core has `num_virtual` points on a hash ring; from the adapter's hash,
clockwise:

1. the first core where the adapter is warm and whose load is at most the mean over the cores up
   (tight: a warm core that is below its share costs nothing and keeps the cores even);
2. else, the first core where it is warm whose load is at most the mean plus `cold_load_tokens` (the
   work a cold load from disk is worth: an adapter stays where its weights are until its core holds
   that much more than its share, rather than have a second core load it);
3. else, the first core at most at the mean (a cold load: the same core for an adapter every time
   while loads are even, so its traffic gathers there and it becomes warm there).

A core is always at most at the mean (the least loaded one), so some core is chosen. The default
`cold_load_tokens`, 256, is an estimate: about 100 ms of a GPU core's batched decode, the order of reading
a rank-16 adapter of a 7B model (tens of MB) from disk; on the CPU bench's tiny model 4 requests of 64.
Two cores thus stay within 2 x 256 tokens of each other, where a bound of 1.25 x the mean number of
requests let a burst split 80/48 and one core idle while the other finished. "Warm" is the
router's own estimate: the `warm_capacity` adapters last sent to a core (its device slots), which a core
that restarts loses. A hot adapter is thus warm on two cores and split evenly between them, a cold one
stays on one. Requests without an adapter go to the least loaded core; a core that is down is skipped.
Not thread-safe: the caller holds its lock around `pick`/`acquire`/`release`.
"""

from __future__ import annotations

import bisect
import hashlib
from collections import OrderedDict

from node.errors import Unavailable

COLD_LOAD_TOKENS = 256  # queued tokens worth one adapter load from disk (see the module docstring)


def _point(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


class CoreRouter:
    def __init__(self, num_cores: int, warm_capacity: int = 32, cold_load_tokens: int = COLD_LOAD_TOKENS,
                 num_virtual: int = 64) -> None:
        assert num_cores >= 1 and warm_capacity >= 1 and cold_load_tokens >= 0
        self.num_cores, self.warm_capacity, self.cold_load_tokens = num_cores, warm_capacity, cold_load_tokens
        self.loads = [0] * num_cores  # queued tokens
        self.is_up = [True] * num_cores
        self._warm: list[OrderedDict[str, None]] = [OrderedDict() for _ in range(num_cores)]
        ring = sorted((_point(f"core-{core}#{v}"), core) for core in range(num_cores) for v in range(num_virtual))
        self._points = [p for p, _ in ring]
        self._cores = [c for _, c in ring]

    def mean(self) -> float:
        """The mean queued tokens over the cores up."""
        up = self._up()
        return sum(self.loads[core] for core in up) / max(len(up), 1)

    def pick(self, adapter_id: str | None) -> int:
        """The core for a request of this adapter (None: the least loaded core); Unavailable if none is up."""
        up = self._up()
        if not up:
            raise Unavailable("no engine core is running (restarting); retry shortly")
        if adapter_id is None:
            return min(up, key=lambda core: self.loads[core])
        mean = self.mean()
        ring = self._ring(adapter_id)
        warm = [core for core in ring if adapter_id in self._warm[core]]
        for bound, cores in ((mean, warm), (mean + self.cold_load_tokens, warm), (mean, ring)):
            for core in cores:
                if self.loads[core] <= bound:
                    return core
        raise AssertionError("some core up is at or below the mean load")

    def is_warm(self, core: int, adapter_id: str) -> bool:
        return adapter_id in self._warm[core]

    def home(self, adapter_id: str) -> int:
        """The core an adapter goes to first while it is warm nowhere and the cores are even."""
        return self._ring(adapter_id, only_up=False)[0]

    def acquire(self, core: int, work: int, adapter_id: str | None = None) -> None:
        """A request of `work` tokens (prompt + max_tokens) sent to `core`; its adapter is warm there now."""
        self.loads[core] += work
        if adapter_id is not None:
            self.warmed(core, adapter_id)

    def warmed(self, core: int, adapter_id: str) -> None:
        """The core has (or is loading) the adapter: the most recent of its `warm_capacity`."""
        warm = self._warm[core]
        warm[adapter_id] = None
        warm.move_to_end(adapter_id)
        if len(warm) > self.warm_capacity:
            warm.popitem(last=False)

    def release(self, core: int, work: int) -> None:
        assert self.loads[core] >= work, "released more than acquired"
        self.loads[core] -= work

    def forget(self, adapter_id: str) -> None:
        """The adapter was removed from every core."""
        for warm in self._warm:
            warm.pop(adapter_id, None)

    def set_up(self, core: int, is_up: bool) -> None:
        self.is_up[core] = is_up
        if not is_up:
            self.loads[core] = 0  # its requests were failed with it
            self._warm[core].clear()  # and a core started again has no adapter loaded

    def _up(self) -> list[int]:
        return [core for core in range(self.num_cores) if self.is_up[core]]

    def _ring(self, adapter_id: str, only_up: bool = True) -> list[int]:
        """The distinct cores clockwise from the adapter's hash (those up, with `only_up`)."""
        start = bisect.bisect(self._points, _point(adapter_id))
        seen: list[int] = []
        for i in range(len(self._cores)):
            core = self._cores[(start + i) % len(self._cores)]
            if core not in seen and (self.is_up[core] or not only_up):
                seen.append(core)
                if len(seen) == self.num_cores:
                    break
        return seen
