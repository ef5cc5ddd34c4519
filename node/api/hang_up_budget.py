"""How much free work a payer's hang-ups may cost the node.

A client that hangs up before its first token is charged nothing (DESIGN: a client that hangs up is
charged for what was generated) and its hold is released, so the same voucher pays for the next try;
yet the node compiled its grammar (up to 5 s of one of 2 compile threads) or ran its prefill. Repeated,
one funded key kept the compile threads busy for free. So each such release (a hang-up before the first
token, after the hold; never a node fault, a time limit or a refusal) spends from a budget: its
payer's own bucket (`per_payer_rate_per_s`, `per_payer_burst`) if it bought here within `window_s`
(as the cold-load gate counts buyers, node/api/cold_load.py), else one bucket that every other payer
shares (`rate_per_s`, `burst`), so funding many addresses that never buy buys no more.

A payer with such a hang-up in the last `window_s` ("struck") takes a token from its bucket for each
request it sends (given back unless that request too ends in a free hang-up), and gets 429
`hang_up_budget_spent` with a Retry-After, before any compile or prefill, while the bucket is empty. A
payer with none is admitted without a token: one hang-up now and then, or a retry after a node fault,
never meets the budget, and other payers' hang-ups never refuse a payer that has not hung up (a shared
bucket in debt refusing every new payer would let ~20 funded addresses, each hanging up once in 10
minutes, keep every new customer out). So funded addresses that never buy get one free hang-up each per
`window_s`, then share one bucket: free work grows with the escrow an attacker locks in many addresses
(a deposit each), never with how often one address tries. A purchase renews a payer's standing as a
buyer; its bucket refills at its rate.

A funded payer's parallel burst sent before its first recorded hang-up is admitted whole, and may hang
up before any first token for free: it is bounded by its escrow (each request holds its max fee) and
by the node's in-flight limit, once per `window_s` per address (its first hang-up strikes it). Counting
a request's hang-up before it happens would throttle an honest payer's parallel lanes (a dApp with 64
streams queued for their first tokens), and an honest payer's lanes must never be throttled.

The counts here live in the API process: the embedded node's one process, or a replica whose Redis is
down. Replicas that share a Redis share them (node/api/shared_budget.py).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import Protocol

from node.api.cold_load import RecentBuyers, TokenBucket
from node.errors import Overloaded


class HangUpBudgetSpent(Overloaded):
    code = "hang_up_budget_spent"


class HangUps(Protocol):
    """A hang-up budget: the counts of this process, or those all replicas share."""

    def admit(self, key: str | None) -> Ticket: ...
    def give_back(self, ticket: Ticket) -> None: ...
    def spend(self, ticket: Ticket) -> None: ...
    def paid(self, *keys: str) -> None: ...


class Ticket:
    """One admitted request's standing with the budget: `hung_up` when it ends with no token because its
    client left, `done` for any other ending; the first call counts. `is_reserved`: it took a token (its
    payer is struck), `is_own`: of its payer's own bucket (a buyer's)."""

    def __init__(self, budget: HangUps | None = None, key: str = "", is_reserved: bool = False,
                 is_own: bool = False) -> None:
        self.budget, self.key, self.is_reserved, self.is_own = budget, key, is_reserved, is_own
        self._lock, self._is_open = threading.Lock(), True

    def hung_up(self) -> None:
        if self._close() and self.budget is not None:
            self.budget.spend(self)

    def done(self) -> None:
        if self._close() and self.is_reserved and self.budget is not None:
            self.budget.give_back(self)

    def _close(self) -> bool:
        with self._lock:
            was_open, self._is_open = self._is_open, False
            return was_open


def refusal(wait_s: float) -> HangUpBudgetSpent:
    retry_after_s = max(math.ceil(wait_s), 1)
    return HangUpBudgetSpent(f"too many requests ended by a hang-up before their first token (free, yet the node "
                             f"compiled or prefilled them); retry in {retry_after_s} s", retry_after_s=retry_after_s)


class HangUpBudget:
    def __init__(self, *, rate_per_s: float = 1 / 30, burst: int = 8, per_payer_rate_per_s: float = 1 / 60,
                 per_payer_burst: int = 8, window_s: float = 600.0, max_payers: int = 100_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.clock, self.window_s, self.max_payers = clock, window_s, max_payers
        self.per_payer_rate_per_s, self.per_payer_burst = per_payer_rate_per_s, per_payer_burst
        self.shared = TokenBucket(rate_per_s, burst, clock)
        self.buyers = RecentBuyers(window_s, max_payers, clock)
        self._own: dict[str, TokenBucket] = {}  # a buyer's key -> its bucket
        self._struck: dict[str, float] = {}  # key -> when it last hung up before its first token
        self._lock = threading.Lock()

    def admit(self, key: str | None) -> Ticket:
        """The request's ticket; HangUpBudgetSpent (429) when its payer's hang-ups spent its budget."""
        if key is None:  # no payment: refused (402) before any work
            return Ticket()
        is_own = key in self.buyers
        if not self._is_struck(key):
            return Ticket(self, key, is_own=is_own)
        bucket = self._bucket(key, is_own)
        if not bucket.take():
            raise refusal(bucket.wait_s(1.0))
        return Ticket(self, key, is_reserved=True, is_own=is_own)

    def paid(self, *keys: str) -> None:
        self.buyers.paid(*keys)

    def give_back(self, ticket: Ticket) -> None:
        """A request that took a token ended otherwise than by a free hang-up: its token returns."""
        self._bucket(ticket.key, ticket.is_own).give_back()

    def spend(self, ticket: Ticket) -> None:
        """The request ended with no token, its client gone: one token spent (its reserved one), its payer struck."""
        if not ticket.is_reserved:
            self._bucket(ticket.key, ticket.is_own).spend()
        with self._lock:
            now = self.clock()
            if len(self._struck) >= self.max_payers:
                for old in [k for k, at in self._struck.items() if now - at >= self.window_s]:
                    del self._struck[old]
            self._struck[ticket.key] = now

    def _bucket(self, key: str, is_own: bool) -> TokenBucket:
        if not is_own:
            return self.shared
        with self._lock:
            bucket = self._own.get(key)
            if bucket is None:
                if len(self._own) >= self.max_payers:  # a full bucket is as good as a new one
                    for full in [k for k, b in self._own.items() if b.level() >= b.burst]:
                        del self._own[full]
                bucket = self._own[key] = TokenBucket(self.per_payer_rate_per_s, self.per_payer_burst, self.clock)
            return bucket

    def _is_struck(self, key: str) -> bool:
        with self._lock:
            at = self._struck.get(key)
            return at is not None and self.clock() - at < self.window_s
