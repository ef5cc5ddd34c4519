"""A plain (unstreamed) request's hold and its place in the engine's queue, taken in one thread hop.

A burst of requests crosses the event loop breadth first: a request's next step after a thread hop waits
behind the parsing of every request that arrived meanwhile (one sweep of the loop's ready queue). With
the hold on a thread and the engine's queue reached back on the loop, the engine got the first request
of a burst of 128 only once all 128 had been parsed and held (150-250 ms of the API's CPU, the engine
idle meanwhile). Queued on the hold's thread, right after the hold commits, the engine starts on the
burst's first request while the loop still parses the rest.

The money rules are those of `GenerationService._complete`: a request that cannot be queued (every choice)
has its queued choices aborted and its hold released before the error is raised; a caller cancelled while
the hop runs (the server stopping) gets the same once the hop ends, nothing having left the node.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

from node.api.engine_client import EngineClient
from node.api.job import CLIENT_LEFT, Cut, Job
from node.engine.sequence import RequestOutput
from node.payment.service import Hold, PaymentService, Replay


@dataclass(frozen=True)
class QueuedJob:
    job: Job
    waiting: list[asyncio.Future[RequestOutput]]  # each choice's output, in choice order


def hold_and_queue(hold: Callable[[], Hold | Replay], job_of: Callable[[Hold], Job], engine: EngineClient,
                   payments: PaymentService, loop: asyncio.AbstractEventLoop) -> QueuedJob | Replay:
    """On a worker thread: the hold (or the voucher's stored answer), then every choice queued on the engine."""
    held = hold()
    return held if isinstance(held, Replay) else queue(held, job_of, engine, payments, loop)


def queue(held: Hold, job_of: Callable[[Hold], Job], engine: EngineClient, payments: PaymentService,
          loop: asyncio.AbstractEventLoop) -> QueuedJob:
    """Every choice of the held request queued on the engine; if the engine refuses one, the choices queued
    before it are aborted and the hold is released (on the caller's thread) before the error is raised."""
    job = job_of(held)
    prefix_key = job.request_id if len(job.choice_ids) > 1 else None
    waiting: list[asyncio.Future[RequestOutput]] = []
    try:
        for params, request_id in zip(job.choice_params, job.choice_ids, strict=True):
            waiting.append(engine.submit(job.prompt_ids, params, job.adapter.engine_adapter, request_id, prefix_key,
                                         loop=loop))
    except BaseException:
        Cut(engine, job.choice_ids)(CLIENT_LEFT)  # the choices already queued
        payments.cancel(job.hold)
        raise
    return QueuedJob(job, waiting)


async def held_and_queued(hold: Callable[[], Hold | Replay], job_of: Callable[[Hold], Job], engine: EngineClient,
                          payments: PaymentService, threads: Executor) -> QueuedJob | Replay:
    """`hold_and_queue` on one of the paid path's `threads` (node/api/payment_threads.py), with this task's
    context (as `asyncio.to_thread`)."""
    loop = asyncio.get_running_loop()
    context = contextvars.copy_context()
    hop = loop.run_in_executor(threads, context.run, hold_and_queue, hold, job_of, engine, payments, loop)
    try:
        return await asyncio.shield(hop)
    except asyncio.CancelledError:
        hop.add_done_callback(lambda done: _undo(done, engine, payments, threads))
        raise


def _undo(done: asyncio.Future[QueuedJob | Replay], engine: EngineClient, payments: PaymentService,
          threads: Executor) -> None:
    """Nobody waits for the request any more: end its choices and release its hold (no token left the node)."""
    if done.cancelled() or done.exception() is not None:
        return
    queued = done.result()
    if isinstance(queued, QueuedJob):
        Cut(engine, queued.job.choice_ids)(CLIENT_LEFT)
        done.get_loop().run_in_executor(threads, payments.cancel, queued.job.hold)  # an error is logged by asyncio
