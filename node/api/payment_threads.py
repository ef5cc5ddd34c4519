"""The paid path's own threads: every hold, charge, release and write-off of a paid request runs here.

The event loop's default executor runs free work too: any caller's long prompt is tokenized there, a
quote's included (no key, no escrow needed). Holds and charges queued behind that work: a stranger
keeping a few hundred quotes of the longest prompt in flight made each paying request wait seconds,
once for its hold and again for its charge (tests/adversarial/test_tokenize_flood.py). Here they wait
only for other paid requests' database work, which the requests in flight bound.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


class PaymentThreads:
    """As many threads as the loop's default executor has (the paid path had those to share before)."""

    def __init__(self, max_workers: int | None = None) -> None:
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
