"""/health, /ready and /metrics for operators and orchestrators."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from node.api.deps import CatalogDep, DatabaseDep, EngineDep, MetricsDep
from node.db import queries

router = APIRouter(tags=["ops"])


@router.get("/health")
def health() -> dict[str, str]:
    """The process is up (it says nothing of the database or the chain: see /ready)."""
    return {"status": "ok"}


@router.get("/ready", responses={503: {"description": "not ready: the same body, saying which check failed"}})
def ready(db: DatabaseDep, catalog: CatalogDep, engine: EngineDep) -> JSONResponse:
    """Ready for paid work: an engine core is up, the database answers and the chain mirror can be trusted
    (else 503, with `reason` saying why: the engine restarting, another chain, the indexer stalled or
    halted, the mirror too far behind). It never waits on the engine: a stalled step does not stall it."""
    checks: dict[str, Any] = {"engine": engine.is_serving}
    if engine.cores_up is not None:  # a core stalled, dead or starting again is not up
        checks["engineCoresUp"], checks["engineCores"] = engine.cores_up
    try:
        with db() as session:
            session.execute(text("SELECT 1"))
            head = queries.mirror_head(session)
        checks["database"] = True
        problem = catalog.mirror_problem(head)
        checks["mirror"] = problem is None
        checks["mirrorBlock"] = None if head is None else head.last_block
        checks["headBlock"] = None if head is None else head.head_block
        seen_at = None if head is None else head.checked_at or head.updated_at
        checks["mirrorLagSeconds"] = None if seen_at is None else (datetime.now(UTC) - seen_at).total_seconds()
        if problem:
            checks["reason"] = problem
        elif not checks["engine"]:
            checks["reason"] = "no engine core is running (it is being started again)"
    except SQLAlchemyError:
        checks["database"] = False
        checks["mirror"] = False
        checks["reason"] = "the database is unavailable"
    ok = checks["engine"] and checks["database"] and checks["mirror"]
    return JSONResponse({"ready": ok, **checks}, status_code=200 if ok else 503)


@router.get("/metrics", response_class=PlainTextResponse)
def metrics(api_metrics: MetricsDep) -> Response:
    return Response(api_metrics.render(), media_type="text/plain; version=0.0.4")
