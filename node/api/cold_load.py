"""Who may make the node fetch an adapter that is not in its host memory, before paying anything.

A chat request needs its adapter's own chat template to count its prompt, so the adapter's files are
fetched (from its registered source, verified, parsed) before the hold, and so does a chat quote. Left
open, anyone could name every registered adapter in turn and keep the node downloading and evicting
adapters for free. So a load that is not yet in host memory goes ahead at once only for a `Caller`
that can pay at this node (a lane payer with spendable escrow, an x402 channel with an unclaimed
deposit), and only `per_payer` times per `window_s` until that caller buys something (a charge resets
its count): a funded account that never buys cannot make the node fetch thousands of adapters.
Everyone else, and a caller past its budget, shares one token bucket (`rate_per_s`, `burst`) and gets
429 when it is empty. A quote names its payer without proving it, so a quote spends a budget of its
own (`Caller.key` says whose: naming someone else's address cannot use up the real payer's). Escrow
of one unit is enough to be a paying caller, so many funded addresses (or x402 channels) would each
bring a budget of their own: only a proven caller that bought here within `window_s` loads on its
budget alone; quotes and callers that have not bought share one more bucket (`named_rate_per_s`,
`named_burst`), so naming every funded address in turn, or funding many, buys no more than that (the
SDK quotes the lane instead when refused, then pays). The counts here live in the API process: the
embedded node's one process, or a replica whose Redis is down. Replicas that share a Redis share them
(node/api/shared_budget.py).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from node.errors import Overloaded
from node.lora.provider import AdapterRegistrar, LoadState
from node.payment.voucher_check import CheckedVoucher
from node.payment.x402.channel_check import X402Refused
from node.payment.x402.service import X402Checked, X402Payments, X402Voucher


@dataclass(frozen=True)
class Caller:
    """Who asks: `key` names the budget a cold load spends (`lane:0x..`, `quote:0x..`, `x402:0x..`);
    `spendable` reads what it could pay with here (read only while its budget lasts)."""

    key: str
    spendable: Callable[[], int]
    is_proven: bool = True  # a voucher's signature or a checked x402 channel; False: a quote's `payer`


def lane_caller(payer: str, spendable: Callable[[str], int], *, quote: bool = False) -> Caller:
    """A lane payer: proven by its voucher's signature, or only named by a quote (a budget of its own)."""
    return Caller(f"{'quote' if quote else 'lane'}:{payer.lower()}", lambda: spendable(payer), is_proven=not quote)


def caller_of(checked: CheckedVoucher | None, x402: X402Checked | X402Refused | None,
              spendable: Callable[[str], int], payments: X402Payments | None) -> Caller | None:
    """Whose budget a paid request's cold load spends: its voucher's payer, or its checked x402 channel."""
    if checked is not None:
        return lane_caller(checked.payer, spendable)
    if isinstance(x402, X402Checked) and payments is not None:
        return Caller(f"x402:0x{x402.channel_id.hex()}", lambda: payments.unclaimed(x402))
    return None


def buyer_keys(voucher: CheckedVoucher) -> tuple[str, ...]:
    """The budgets a purchase paid with `voucher` renews: its x402 channel's, or its payer's (both kinds)."""
    if isinstance(voucher, X402Voucher):
        return (f"x402:0x{voucher.x402.channel_id.hex()}",)
    return (f"lane:{voucher.payer.lower()}", f"quote:{voucher.payer.lower()}")


class ColdLoads(Protocol):
    """The cold-load gate: the counts of this process, or those all replicas share."""

    async def admit(self, adapter: str, caller: Caller | None) -> None: ...
    def paid(self, *keys: str) -> None: ...


def cold_refusal(adapter: str) -> Overloaded:
    return Overloaded("too many requests for adapters that are not loaded, from callers without escrow at this "
                      "node or past their loads without a purchase; retry shortly, or buy", adapter=adapter)


class TokenBucket:
    """`burst` tokens, refilled at `rate_per_s`; `take` needs a whole token, `spend` runs into a debt of at
    most `burst` (paid back by the refill), `give_back` returns a token taken."""

    def __init__(self, rate_per_s: float, burst: int, clock: Callable[[], float]) -> None:
        self.rate_per_s, self.burst, self.clock = rate_per_s, burst, clock
        self.tokens, self._at = float(burst), clock()
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            self._refill()
            if self.tokens < 1.0:
                return False
            self.tokens -= 1.0
            return True

    def spend(self) -> None:
        with self._lock:
            self._refill()
            self.tokens = max(self.tokens - 1.0, -float(self.burst))

    def give_back(self) -> None:
        with self._lock:
            self._refill()
            self.tokens = min(self.tokens + 1.0, float(self.burst))

    def level(self) -> float:
        with self._lock:
            self._refill()
            return self.tokens

    def wait_s(self, level: float = 1.0, max_s: float = 600.0) -> float:
        """Seconds until the bucket holds `level` tokens (at most `max_s`)."""
        missing = level - self.level()
        if missing <= 0:
            return 0.0
        return min(missing / self.rate_per_s, max_s) if self.rate_per_s > 0 else max_s

    def _refill(self) -> None:
        now = self.clock()
        self.tokens = min(float(self.burst), self.tokens + (now - self._at) * self.rate_per_s)
        self._at = now


class RecentBuyers:
    """Who bought something here within `window_s` (at most `max_payers` remembered; stale ones make room)."""

    def __init__(self, window_s: float, max_payers: int, clock: Callable[[], float]) -> None:
        self.window_s, self.max_payers, self.clock = window_s, max_payers, clock
        self._bought: dict[str, float] = {}  # key -> when it last bought something
        self._lock = threading.Lock()

    def paid(self, *keys: str) -> None:
        with self._lock:
            now = self.clock()
            if len(self._bought) >= self.max_payers:
                for key in [k for k, at in self._bought.items() if now - at >= self.window_s]:
                    del self._bought[key]
            for key in keys:
                if len(self._bought) < self.max_payers or key in self._bought:
                    self._bought[key] = now

    def __contains__(self, key: str) -> bool:
        with self._lock:
            at = self._bought.get(key)
            return at is not None and self.clock() - at < self.window_s


class ColdLoadGate:
    def __init__(self, provider: AdapterRegistrar, *, rate_per_s: float = 2.0, burst: int = 16,
                 named_rate_per_s: float = 1.0, named_burst: int = 8, per_payer: int = 8, window_s: float = 600.0,
                 max_payers: int = 100_000, clock: Callable[[], float] = time.monotonic) -> None:
        self.provider, self.clock = provider, clock
        self.free, self.named = TokenBucket(rate_per_s, burst, clock), TokenBucket(named_rate_per_s, named_burst, clock)
        self.per_payer, self.window_s, self.max_payers = per_payer, window_s, max_payers
        self._unpaid: dict[str, tuple[int, float]] = {}  # key -> (cold loads since its last purchase, since when)
        self.buyers = RecentBuyers(window_s, max_payers, clock)
        self._lock = threading.Lock()

    async def admit(self, adapter: str, caller: Caller | None) -> None:
        """Returns when `adapter` may be loaded for this caller; Overloaded (429) when not now."""
        if self.provider.state(adapter) is LoadState.READY:
            return
        if caller is not None and self._budget(caller.key) and await asyncio.to_thread(caller.spendable) > 0 \
                and ((caller.is_proven and caller.key in self.buyers) or self.named.take()) \
                and self._spend(caller.key):
            return
        if not self.free.take():
            raise cold_refusal(adapter)

    def paid(self, *keys: str) -> None:
        """These callers bought something: their cold loads since count for nothing, and for a window
        they load on their own budget."""
        with self._lock:
            for key in keys:
                self._unpaid.pop(key, None)
        self.buyers.paid(*keys)

    def _budget(self, key: str) -> bool:
        with self._lock:
            return self._count(key)[0] < self.per_payer and (key in self._unpaid or self._room())

    def _spend(self, key: str) -> bool:
        """Count one cold load against `key`, if its budget still allows (checked again: requests race)."""
        with self._lock:
            count, since = self._count(key)
            if count >= self.per_payer or (key not in self._unpaid and not self._room()):
                return False
            self._unpaid[key] = (count + 1, since)
            return True

    def _count(self, key: str) -> tuple[int, float]:
        """Under the lock: the key's cold loads in its current window, and when that window began."""
        now = self.clock()
        count, since = self._unpaid.get(key, (0, now))
        return (0, now) if now - since >= self.window_s else (count, since)

    def _room(self) -> bool:
        """Under the lock: room for one more caller's count (the stale ones are dropped when full)."""
        if len(self._unpaid) < self.max_payers:
            return True
        now = self.clock()
        for key in [k for k, (_, since) in self._unpaid.items() if now - since >= self.window_s]:
            del self._unpaid[key]
        return len(self._unpaid) < self.max_payers
