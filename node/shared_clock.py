"""A replica's wall clock set by the clock its replicas share: the time of their one PostgreSQL (the ledger's
holds) or their one Redis (the free-work budgets).

Every API replica stamps shared rows with its clock and judges the stamps of the others by it: a hold's age
(does it still count against the escrow, may another voucher take its lane, may it still be charged), a budget
bucket's refill. Clocks that disagree by more than the margins (ledger.py's `max_clock_skew_s`, 5 s) let a
replica running ahead take over a lane another may still charge, spend an escrow twice, or refill a budget
on every stamp of a replica behind it. So each replica reads the shared server's clock (one round trip, every
`REFRESH_S`) and adds the difference to its own: replicas agree to the round trip's length whatever their
own clocks say, and a clock stepped by NTP is followed within `REFRESH_S`. A failed read keeps the last
difference (none at first: the replica's own clock) and is tried again after `RETRY_S`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)
REFRESH_S, RETRY_S, WARN_S = 60.0, 5.0, 1.0


class SharedClock:
    """`local` (seconds since the epoch) plus its difference to `reference`, the shared server's clock."""

    def __init__(self, local: Callable[[], float], reference: Callable[[], float], name: str,
                 resolution_s: float | None = None, monotonic: Callable[[], float] = time.monotonic,
                 background: bool = False) -> None:
        self.local, self.reference, self.name, self.monotonic = local, reference, name, monotonic
        # read the reference on a thread of its own (the caller goes on with the last difference): for a
        # reference with no bounded timeout (a database connection), as the caller may be the event loop
        self.background = background
        self.resolution_s = resolution_s  # the difference rounded to a multiple of this (None: as read)
        self.offset = 0.0
        self._due = monotonic()  # monotonic() of the next read of the reference
        self._lock = threading.Lock()

    def __call__(self) -> float:
        if self.monotonic() >= self._due and self._lock.acquire(blocking=False):
            # one thread reads; the others go on with the last difference meanwhile
            if self.background:
                threading.Thread(target=self._measure_and_release, name=f"{self.name} clock", daemon=True).start()
            else:
                self._measure_and_release()
        return self.local() + self.offset

    def measure(self) -> None:
        """Read the reference now, in this thread (a replica's start, a test)."""
        with self._lock:
            self._measure()

    def _measure_and_release(self) -> None:
        try:
            self._measure()
        finally:
            self._lock.release()

    def _measure(self) -> None:
        before = self.local()
        try:
            shared = self.reference()
        except Exception as exc:  # the server is not there: the last difference until it is
            self._due = self.monotonic() + RETRY_S
            log.warning("could not read the %s's clock (%s): this replica keeps a difference of %+.3f s to it",
                        self.name, type(exc).__name__, self.offset)
            return
        after = self.local()
        offset = shared - (before + after) / 2
        self.offset = offset if self.resolution_s is None else round(offset / self.resolution_s) * self.resolution_s
        self._due = self.monotonic() + REFRESH_S
        if abs(self.offset) > WARN_S:
            log.warning("this replica's clock is %+.1f s off the %s's: timing by the %s's; fix its NTP (the x402 "
                        "facilitator's authorization windows read this clock)", -self.offset, self.name, self.name)
