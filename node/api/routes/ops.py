"""/health, /ready and /metrics for operators and orchestrators."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from node.api.deps import NodeServices, services
from node.db import queries
from node.db.models import IndexerCursor

router = APIRouter(tags=["ops"])


@router.get("/health")
def health() -> dict[str, str]:
    """The process is up (it says nothing of the database or the chain: see /ready)."""
    return {"status": "ok"}


@router.get("/ready", responses={503: {"description": "not ready: the same body, saying which check failed"}})
def ready(svc: NodeServices = Depends(services)) -> JSONResponse:
    checks: dict[str, Any] = {"engine": True}
    try:
        with svc.db() as session:
            session.execute(text("SELECT 1"))
            head = queries.mirror_head(session)
            cursor = session.get(IndexerCursor, svc.chain_id)
        checks["database"] = True
        lag = None if cursor is None else (datetime.now(UTC) - cursor.updated_at).total_seconds()
        checks["mirror"] = head is not None and lag is not None and lag <= svc.max_mirror_lag_s
        checks["mirrorBlock"] = None if head is None else head.last_block
        checks["mirrorLagSeconds"] = lag
    except SQLAlchemyError:
        checks["database"] = False
        checks["mirror"] = False
    ok = checks["engine"] and checks["database"] and checks["mirror"]
    return JSONResponse({"ready": ok, **checks}, status_code=200 if ok else 503)


@router.get("/metrics", response_class=PlainTextResponse)
def metrics(svc: NodeServices = Depends(services)) -> Response:
    return Response(svc.metrics.render(), media_type="text/plain; version=0.0.4")
