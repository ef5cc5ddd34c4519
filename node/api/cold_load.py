"""Who may make the node fetch an adapter that is not in its host memory, before paying anything.

A chat request needs its adapter's own chat template to count its prompt, so the adapter's files are
fetched (from its registered source, verified, parsed) before the hold, and so does a chat quote. Left
open, anyone could name every registered adapter in turn and keep the node downloading and evicting
adapters for free. So a load that is not yet in host memory goes ahead at once only for a caller who
names a payer with spendable escrow at this node (the voucher's payer, or a quote's `payer`); anyone
else shares one token bucket (`rate_per_s`, `burst`) and gets 429 when it is empty. A caller with
escrow can still ask for cold adapters without buying (docs/security.md): that costs a deposit, not nothing.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

from node.errors import Overloaded
from node.lora.provider import AdapterRegistrar, LoadState


class ColdLoadGate:
    def __init__(self, provider: AdapterRegistrar, spendable: Callable[[str], int], *, rate_per_s: float = 2.0,
                 burst: int = 16, clock: Callable[[], float] = time.monotonic) -> None:
        self.provider, self.spendable = provider, spendable
        self.rate_per_s, self.burst, self.clock = rate_per_s, burst, clock
        self._tokens, self._at = float(burst), clock()
        self._lock = threading.Lock()

    async def admit(self, adapter: str, payer: str | None) -> None:
        """Returns when `adapter` may be loaded for this caller; Overloaded (429) when not now."""
        if self.provider.state(adapter) is LoadState.READY:
            return
        if payer is not None and await asyncio.to_thread(self.spendable, payer) > 0:
            return
        if not self._take():
            raise Overloaded("too many requests for adapters that are not loaded, from callers without escrow "
                             "at this node; retry shortly, or name a funded payer", adapter=adapter)

    def _take(self) -> bool:
        with self._lock:
            now = self.clock()
            self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.rate_per_s)
            self._at = now
            if self._tokens < 1.0:
                return False
            self._tokens -= 1.0
            return True
