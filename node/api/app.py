"""The FastAPI app factory. The services are built elsewhere (see node/api/wiring.py) and passed in."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from node import __version__
from node.api.deps import NodeServices
from node.api.error_handlers import install_error_handlers
from node.api.routes import epochs, inference, info, ops


def create_app(svc: NodeServices) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        svc.engine.engine.start()
        try:
            yield
        finally:
            for stop in svc.on_shutdown:
                stop()

    app = FastAPI(title="loranode", version=__version__, lifespan=lifespan,
                  description="Paid multi-adapter inference with signed attribution receipts.")
    app.state.services = svc
    install_error_handlers(app)
    for router in (inference.router, info.router, ops.router, epochs.router):
        app.include_router(router)
    return app
