"""The FastAPI app factory. The services are built elsewhere (see node/api/wiring.py) and passed in."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta

from fastapi import FastAPI
from sqlalchemy.exc import OperationalError

from node import __version__
from node.api.deps import NodeServices
from node.api.error_handlers import install_error_handlers
from node.api.routes import epochs, inference, info, models, ops, x402, x402_refund

log = logging.getLogger(__name__)
# py_ecc (imported by eth-keys) raises the interpreter's recursion limit to 100,000 on import, so a JSON text
# nested that deep (a chat tool call's arguments, free to send in a quote) overflowed the C stack and killed
# the process instead of raising RecursionError. Far above what any request or library here needs (the
# signatures are coincurve's), far below what a thread's 8 MiB stack holds (about 70,000 JSON levels).
MAX_RECURSION_DEPTH = 10_000


async def prune_responses(svc: NodeServices) -> None:
    """Forget stored response bodies past the idempotency window, every `prune_interval_s`. The
    vouchers and receipts stay; a voucher older than the window is refused, never served again."""
    window = timedelta(seconds=svc.idempotency_window_s)
    while True:
        try:
            forgotten = await asyncio.to_thread(svc.payments.ledger.forget_responses, window)
            if forgotten:
                log.info("forgot %d response bodies past the idempotency window", forgotten)
        except OperationalError as exc:  # the database is down: try again next time
            log.warning("pruning responses failed: %s", type(exc).__name__)
        await asyncio.sleep(svc.prune_interval_s)


async def record_spooled_losses(svc: NodeServices) -> None:
    """Move the write-offs the database refused (node/payment/loss_spool.py) into it at start and every
    `loss_flush_interval_s`, so a node that serves no paid request records them too. A spool it cannot
    read is logged and tried again next time."""
    while True:
        try:
            await asyncio.to_thread(svc.payments.flush_unrecorded)  # logs what still waits
        except OSError as exc:
            log.error("the loss spool could not be read: %s", exc)
        await asyncio.sleep(svc.loss_flush_interval_s)


def create_app(svc: NodeServices) -> FastAPI:
    sys.setrecursionlimit(MAX_RECURSION_DEPTH)  # every import that could raise it is done by now
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        svc.engine.engine.start()
        tasks = [asyncio.create_task(prune_responses(svc)), asyncio.create_task(record_spooled_losses(svc))]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            for stop in svc.on_shutdown:
                stop()

    app = FastAPI(title="loranode", version=__version__, lifespan=lifespan,
                  description="Paid multi-adapter inference with signed attribution receipts.")
    app.state.services = svc
    install_error_handlers(app)
    for router in (inference.router, info.router, models.router, ops.router, epochs.router, x402.router,
                   x402_refund.router):
        app.include_router(router)
    return app
