"""The services a running API holds, and the dependency that hands them to routes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from fastapi import Request
from sqlalchemy.orm import Session, sessionmaker

from node.api.engine_client import EngineClient
from node.api.generation import GenerationService
from node.api.metrics import APIMetrics
from node.catalog import AdapterCatalog
from node.payment.service import PaymentService


@dataclass
class NodeServices:
    engine: EngineClient
    payments: PaymentService
    catalog: AdapterCatalog
    db: sessionmaker[Session]
    metrics: APIMetrics
    generation: GenerationService
    chain_id: int
    settlement_address: str
    max_mirror_lag_s: float = 120.0
    idempotency_window_s: float = 86_400.0  # how long a served voucher's response is kept for retries
    prune_interval_s: float = 600.0
    on_shutdown: list[Callable[[], None]] = field(default_factory=list)


async def services(request: Request) -> NodeServices:
    """Async on purpose: FastAPI runs a plain `def` dependency on its thread pool, one thread hop
    (and the GIL handed over twice) per request for a single attribute read."""
    return request.app.state.services  # type: ignore[no-any-return]
