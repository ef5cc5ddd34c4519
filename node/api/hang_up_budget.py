"""How much free work a payer's hang-ups may cost the node.

A client that hangs up before its first token is charged nothing (DESIGN: a client that hangs up is
charged for what was generated) and its hold is released, so the same voucher pays for the next try;
yet the node compiled its grammar (up to 5 s of one of 2 compile threads) or ran its prefill. Repeated,
one funded key kept the compile threads busy for free. So each such release (a hang-up before the first
token, after the hold; never a node fault, a time limit or a refusal) spends from a budget: its
payer's own bucket (`per_payer_rate_per_s`, `per_payer_burst`) if it bought here within `window_s`
(as the cold-load gate counts buyers, node/api/cold_load.py), else one bucket that every other payer
shares (`rate_per_s`, `burst`), so funding many addresses that never buy buys no more.

A request whose free work runs before its first token (a stream, a structured answer) reserves at
admission what its hang-up would spend: a token of its bucket, given back at its first token (or its
end), else, while its payer has not hung up, one of `max_unreserved` places of its payer's own. A
payer with none left waits (an honest payer's parallel lanes, never refused: each first token makes
room), so a burst hung up before any first token is bounded by the budget too; a plain request is
admitted without one (`reserve=False`: its prefill's hang-up is counted when it happens).

A payer with such a hang-up in the last `window_s` ("struck") takes a token for every request it
sends, and gets 429 `hang_up_budget_spent` with a Retry-After, before any compile or prefill, while
its bucket is empty. Other payers' hang-ups never refuse a payer that has not hung up (a shared bucket
in debt refusing every new payer would let ~20 funded addresses, each hanging up once in 10 minutes,
keep every new customer out): it gets its unreserved place. So funded addresses that never buy get
`max_unreserved` free hang-ups each per `window_s`, then share one bucket: free work grows with the
escrow an attacker locks in many addresses (a deposit each), never with how often one address tries. A
purchase renews a payer's standing as a buyer; its bucket refills at its rate.

The counts here live in the API process: the embedded node's one process, or a replica whose Redis is
down. Replicas that share a Redis share them (node/api/shared_budget.py).
"""

from __future__ import annotations

import asyncio
import enum
import math
import threading
import time
from collections.abc import Callable
from typing import Protocol

from node.api.cold_load import RecentBuyers, TokenBucket
from node.errors import Overloaded

MAX_WAIT_S = 30.0  # a payer waiting this long for room among its own requests gets 429
PLACE_TTL_S = 300.0  # an unreserved place whose request never ended (a replica gone) is free again after this


class HangUpBudgetSpent(Overloaded):
    code = "hang_up_budget_spent"


class Reserved(enum.IntEnum):
    """What an admitted request holds until its first token or its end."""

    NONE = 0  # nothing: its hang-up spends from its bucket when it happens
    TOKEN = 1  # a token of its bucket
    PLACE = 2  # one of its payer's unreserved places (its bucket was empty)


class HangUps(Protocol):
    """A hang-up budget: the counts of this process, or those all replicas share."""

    def admit(self, key: str | None, reserve: bool = True) -> Ticket | None: ...
    def release(self, ticket: Ticket, reserved: Reserved) -> None: ...
    def spend(self, ticket: Ticket) -> None: ...
    def paid(self, *keys: str) -> None: ...


class Ticket:
    """One admitted request's standing with the budget, closed by the first call of: `first_token` (its
    free work is over), `hung_up` (it ended with no token because its client left), `done` (any other
    end). `unreserve` gives back what it reserved and leaves it open (a hang-up still counts)."""

    def __init__(self, budget: HangUps | None = None, key: str = "", reserved: Reserved = Reserved.NONE,
                 is_own: bool = False, name: str = "") -> None:
        self.budget, self.key, self.reserved, self.is_own, self.name = budget, key, reserved, is_own, name
        self._lock, self._is_open = threading.Lock(), budget is not None

    def first_token(self) -> None:
        if self._is_open:  # every delta calls it: cheap once closed
            self.done()

    def unreserve(self) -> None:
        with self._lock:
            reserved = self.reserved if self._is_open else Reserved.NONE
            self.reserved = Reserved.NONE
        if reserved is not Reserved.NONE and self.budget is not None:
            self.budget.release(self, reserved)

    def hung_up(self) -> None:
        if self._close() and self.budget is not None:
            self.budget.spend(self)

    def done(self) -> None:
        if self._close() and self.budget is not None and self.reserved is not Reserved.NONE:
            self.budget.release(self, self.reserved)

    def _close(self) -> bool:
        with self._lock:
            was_open, self._is_open = self._is_open, False
            return was_open


async def admitted(budget: HangUps, key: str | None, reserve: bool = True, max_wait_s: float = MAX_WAIT_S) -> Ticket:
    """The request's ticket, once its payer has room for it; HangUpBudgetSpent (429) when its hang-ups
    spent its budget, Overloaded (429) when its own requests kept it waiting `max_wait_s`."""
    delay, started = 0.005, time.monotonic()
    while (ticket := budget.admit(key, reserve)) is None:
        if time.monotonic() - started >= max_wait_s:
            raise Overloaded("too many of this payer's requests are waiting for their first token; retry shortly",
                             retry_after_s=1)
        await asyncio.sleep(delay)
        delay = min(2 * delay, 0.1)
    return ticket


def refusal(wait_s: float) -> HangUpBudgetSpent:
    retry_after_s = max(math.ceil(wait_s), 1)
    return HangUpBudgetSpent(f"too many requests ended by a hang-up before their first token (free, yet the node "
                             f"compiled or prefilled them); retry in {retry_after_s} s", retry_after_s=retry_after_s)


class HangUpBudget:
    def __init__(self, *, rate_per_s: float = 1 / 30, burst: int = 8, per_payer_rate_per_s: float = 1 / 60,
                 per_payer_burst: int = 8, window_s: float = 600.0, max_unreserved: int = 1,
                 max_payers: int = 100_000, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock, self.window_s, self.max_payers = clock, window_s, max_payers
        self.per_payer_rate_per_s, self.per_payer_burst = per_payer_rate_per_s, per_payer_burst
        self.max_unreserved = max_unreserved
        self.shared = TokenBucket(rate_per_s, burst, clock)
        self.buyers = RecentBuyers(window_s, max_payers, clock)
        self._own: dict[str, TokenBucket] = {}  # a buyer's key -> its bucket
        self._struck: dict[str, float] = {}  # key -> when it last hung up before its first token
        self._places: dict[str, list[float]] = {}  # key -> until when each of its unreserved places is taken
        self._lock = threading.Lock()

    def admit(self, key: str | None, reserve: bool = True) -> Ticket | None:
        """The request's ticket; None while its payer has no room (wait); HangUpBudgetSpent (429) when its
        payer's hang-ups spent its budget."""
        if key is None:  # no payment: refused (402) before any work
            return Ticket()
        is_own = key in self.buyers
        bucket, is_struck = self._bucket(key, is_own), self._is_struck(key)
        if not (reserve or is_struck):
            return Ticket(self, key, Reserved.NONE, is_own)
        if bucket.take():
            return Ticket(self, key, Reserved.TOKEN, is_own)
        if is_struck:
            raise refusal(bucket.wait_s(1.0))
        with self._lock:
            now = self.clock()
            places = [until for until in self._places.get(key, []) if until > now]  # a request never closed
            if len(places) >= self.max_unreserved:
                return None
            self._places[key] = [*places, now + PLACE_TTL_S]
        return Ticket(self, key, Reserved.PLACE, is_own)

    def paid(self, *keys: str) -> None:
        self.buyers.paid(*keys)

    def release(self, ticket: Ticket, reserved: Reserved) -> None:
        """The request's free work is over (a first token) or it ended otherwise: what it reserved returns."""
        if reserved is Reserved.TOKEN:
            self._bucket(ticket.key, ticket.is_own).give_back()
        elif reserved is Reserved.PLACE:
            self._free_place(ticket.key)

    def spend(self, ticket: Ticket) -> None:
        """The request ended with no token, its client gone: one token spent (its reserved one), its payer struck."""
        if ticket.reserved is not Reserved.TOKEN:
            self._bucket(ticket.key, ticket.is_own).spend()
        if ticket.reserved is Reserved.PLACE:
            self._free_place(ticket.key)
        with self._lock:
            now = self.clock()
            if len(self._struck) >= self.max_payers:
                for old in [k for k, at in self._struck.items() if now - at >= self.window_s]:
                    del self._struck[old]
            self._struck[ticket.key] = now

    def _free_place(self, key: str) -> None:
        with self._lock:
            places = self._places.pop(key, [])[1:]
            if places:
                self._places[key] = places

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
