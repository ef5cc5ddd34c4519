"""The paid path's own threads: every hold, charge, release and write-off of a paid request runs here.

The event loop's default executor runs free work too: any caller's long prompt is tokenized there, a
quote's included (no key, no escrow needed). Holds and charges queued behind that work: a stranger
keeping a few hundred quotes of the longest prompt in flight made each paying request wait seconds,
once for its hold and again for its charge (tests/adversarial/test_tokenize_flood.py). Here they wait
only for other paid requests' database work, which the requests in flight bound.

There are `PAYMENT_THREADS` of them, not the default executor's cpu + 4: a charge spends most of its time
waiting for its commit's WAL flush, not on a CPU, and PostgreSQL flushes the commits waiting together
at once. With 6 threads (a 2-CPU box) the 64 answers one engine step finishes were charged 6 at a time,
one flush after another: the burst's last charge started 142, 8 and 157 ms after the engine's last output
reached the API, against 45, 56 and 60 ms with 16; and a burst's holds wait for threads too: from a
request's arrival to its place in the engine's queue, p50 239, 184 and 135 ms against 175, 97 and 109
(bench/api.py's burst of 128, the two alternated in one process, load average 16-23; the API's CPU per
request, 5.7-11.4 ms against 7.7-11.0, and the wall clock did not tell them apart at that load).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
# below the API's database pool (node/db/session.py: 10 connections + 10 overflow), so that readiness
# and receipt reads still find a connection while every payment thread holds one
PAYMENT_THREADS = 16
T = TypeVar("T")


class PaymentThreads:
    """The paid path's threads (`PAYMENT_THREADS` unless told)."""

    def __init__(self, max_workers: int = PAYMENT_THREADS) -> None:
        self.executor = ThreadPoolExecutor(max_workers, thread_name_prefix="payment")

    async def run(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """`fn(*args, **kwargs)` on a payment thread, with this task's context (as `asyncio.to_thread`)."""
        return await self.start(fn, *args, **kwargs)

    def start(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> asyncio.Future[T]:
        """The same, started now: the future of its result (a task may shield it, or leave it running)."""
        call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
        return asyncio.get_running_loop().run_in_executor(self.executor, call)

    def close(self) -> None:
        """Let the work queued finish (charges and releases of the last requests), then stop the threads."""
        self.executor.shutdown(wait=True)
