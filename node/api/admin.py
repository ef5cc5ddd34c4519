"""The operator's admin endpoints, on a port of their own (`admin_port`, bound to `admin_host`,
127.0.0.1 by default) and never on the public API's: pin, unpin, preload and evict an adapter.

Every call carries `Authorization: Bearer <token>`, the token read from `admin_token_file`; without
that file the admin port is not served at all. `loranode adapter pin|unpin|preload|evict` calls them.
"""

from __future__ import annotations

import asyncio
import hmac
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Header, Request

from node import __version__
from node.api.deps import NodeServices, services
from node.api.error_handlers import install_error_handlers
from node.config import read_secret
from node.errors import AdminUnauthorized, BadRequest
from node.lora.manager import AdapterAction

ACTION_TIMEOUT_S = 120.0  # a preload waits for the adapter's download and its copy to the device


def read_admin_token(path: Path) -> str:
    token = read_secret(path, "admin_token_file")
    if len(token) < 16:
        raise ValueError(f"the admin token in {path} is shorter than 16 characters")
    return token


async def _authorized(request: Request, authorization: Annotated[str | None, Header()] = None) -> None:
    expected: str = request.app.state.admin_token
    given = (authorization or "").removeprefix("Bearer ").strip()
    if not (authorization or "").startswith("Bearer ") or not hmac.compare_digest(given.encode(), expected.encode()):
        raise AdminUnauthorized("the admin endpoints need `Authorization: Bearer <admin token>`")


router = APIRouter(prefix="/admin", dependencies=[Depends(_authorized)])


@router.post("/adapters/{model}/{action}")
async def control(model: str, action: str, svc: Annotated[NodeServices, Depends(services)]) -> dict[str, str]:
    """Apply `action` (pin, unpin, preload, evict) to the adapter clients call `model`."""
    try:
        chosen = AdapterAction(action)
    except ValueError:
        raise BadRequest(f"unknown action {action!r}: one of pin, unpin, preload, evict", param="action") from None
    served = await asyncio.to_thread(svc.catalog.resolve, model)
    if served.engine_adapter is None:
        raise BadRequest("the base model is always resident: there is nothing to " + chosen.value, param="model")
    done = svc.engine.engine.control_adapter(served.engine_adapter, chosen)
    await asyncio.wait_for(asyncio.wrap_future(done), ACTION_TIMEOUT_S)
    return {"model": model, "action": chosen.value, "status": "done"}


def create_admin_app(svc: NodeServices, token: str) -> FastAPI:
    app = FastAPI(title="loranode admin", version=__version__, openapi_url=None, docs_url=None, redoc_url=None)
    app.state.services, app.state.admin_token = svc, token
    install_error_handlers(app)
    app.include_router(router)
    return app
