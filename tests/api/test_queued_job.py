"""A plain request is held and queued on the engine in one thread hop (node/api/queued_job.py): whatever keeps
it from running leaves no hold behind and no choice running."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import pytest

from node.api.engine_client import EngineClient
from node.api.hang_up_budget import Ticket
from node.api.job import Job
from node.api.queued_job import QueuedJob, held_and_queued, hold_and_queue
from node.api.schemas import CompletionRequest
from node.catalog import ServedAdapter
from node.engine import SamplingParams
from node.errors import Overloaded
from node.payment.service import Hold, PaymentService

HOLD = cast(Hold, object())  # what the payment service handed out: only its identity matters here


class Engine:
    """Takes `room` choices, then refuses the next with Overloaded (a full queue)."""

    def __init__(self, room: int = 99) -> None:
        self.room, self.queued, self.aborted = room, list[str](), list[str]()

    def submit(self, prompt_ids: list[int], params: SamplingParams, adapter_id: str | None, request_id: str,
               prefix_key: str | None = None, loop: asyncio.AbstractEventLoop | None = None) -> asyncio.Future[Any]:
        if len(self.queued) == self.room:
            raise Overloaded("the engine core is not taking requests (its queue is full); retry shortly")
        self.queued.append(request_id)
        assert loop is not None
        return loop.create_future()

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)


class Payments:
    def __init__(self) -> None:
        self.released: list[Hold] = []

    def cancel(self, hold: Hold) -> None:
        self.released.append(hold)


def job_of(hold: Hold, n: int = 3) -> Job:
    req = CompletionRequest.model_validate({"model": "7", "prompt": "the sea", "max_tokens": 4, "n": n})
    return Job("completion", req, "cmpl-1", "cmpl-1-ab", 0, ServedAdapter(7, "7", 0, None), [1, 2, 3],
               SamplingParams(max_tokens=4), hold, 0.0, Ticket())


def test_every_choice_is_queued_right_after_the_hold() -> None:
    engine, payments, loop = Engine(), Payments(), asyncio.new_event_loop()
    try:
        queued = hold_and_queue(lambda: HOLD, job_of, cast(EngineClient, engine), cast(PaymentService, payments),
                                loop)
    finally:
        loop.close()
    assert isinstance(queued, QueuedJob) and queued.job.hold is HOLD
    assert engine.queued == ["cmpl-1-ab-0", "cmpl-1-ab-1", "cmpl-1-ab-2"] and len(queued.waiting) == 3
    assert payments.released == [] and engine.aborted == []


def test_a_request_the_engine_refuses_midway_releases_its_hold_and_ends_the_choices_queued() -> None:
    engine, payments, loop = Engine(room=2), Payments(), asyncio.new_event_loop()
    try:
        with pytest.raises(Overloaded):
            hold_and_queue(lambda: HOLD, job_of, cast(EngineClient, engine), cast(PaymentService, payments), loop)
    finally:
        loop.close()
    assert payments.released == [HOLD]  # the voucher can be sent again
    assert set(engine.aborted) >= {"cmpl-1-ab-0", "cmpl-1-ab-1"}


def test_a_caller_cancelled_during_the_hop_leaves_no_hold_and_nothing_running() -> None:
    engine, payments, holding = Engine(), Payments(), threading.Event()

    def slow_hold() -> Hold:
        assert holding.wait(10)
        return HOLD

    async def cancelled_midway() -> None:
        request = asyncio.ensure_future(held_and_queued(slow_hold, job_of, cast(EngineClient, engine),
                                                        cast(PaymentService, payments), threads))
        await asyncio.sleep(0.05)
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
        holding.set()  # the hold commits only now, after the caller left
        for _ in range(200):
            if payments.released:
                return
            await asyncio.sleep(0.01)

    with ThreadPoolExecutor(1) as threads:
        asyncio.run(cancelled_midway())
    assert engine.queued == ["cmpl-1-ab-0", "cmpl-1-ab-1", "cmpl-1-ab-2"]
    assert engine.aborted == engine.queued and payments.released == [HOLD]
