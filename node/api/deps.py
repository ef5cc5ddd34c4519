"""The services a running API holds, and the typed dependencies that hand routes what they use.

    def channel(ledger: LedgerDep, pricing: PricingDep, ...)   # not `svc.payments.ledger`
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session, sessionmaker

from node.api.engine_client import EngineClient
from node.api.generation import GenerationService
from node.api.metrics import APIMetrics
from node.catalog import AdapterCatalog
from node.errors import Unavailable
from node.payment.ledger import Ledger
from node.payment.pricing import Pricing
from node.payment.service import PaymentService
from node.payment.x402.refund import X402Refunds
from node.settlement.epoch_sources import EpochSources
from node.settlement.published_trees import PublishedTrees
from node.settlement.split import SplitParams


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
    split: SplitParams | None = None  # the deployment's split, for the earnings it reports
    max_mirror_lag_s: float = 120.0
    idempotency_window_s: float = 86_400.0  # how long a served voucher's response is kept for retries
    prune_interval_s: float = 600.0
    loss_flush_interval_s: float = 60.0  # how often write-offs the database refused are tried again
    on_shutdown: list[Callable[[], None]] = field(default_factory=list)
    x402_refunds: X402Refunds | None = None  # the cooperative refund (GET /x402/refund), with the channel mirror
    trees: PublishedTrees = field(default_factory=PublishedTrees)  # settled epochs' trees, parsed once
    sources: EpochSources = field(default_factory=EpochSources)  # settled epochs' earnings per source, split once


async def services(request: Request) -> NodeServices:
    """Async on purpose: FastAPI runs a plain `def` dependency on its thread pool, one thread hop
    (and the GIL handed over twice) per request for a single attribute read."""
    return request.app.state.services  # type: ignore[no-any-return]


# Async like `services`: each is one attribute read, not worth a thread-pool hop.
async def _payments(svc: Annotated[NodeServices, Depends(services)]) -> PaymentService:
    return svc.payments


async def _node_address(svc: Annotated[NodeServices, Depends(services)]) -> str:
    return svc.payments.node


async def _ledger(svc: Annotated[NodeServices, Depends(services)]) -> Ledger:
    return svc.payments.ledger


async def _pricing(svc: Annotated[NodeServices, Depends(services)]) -> Pricing:
    """Prices that cover any request, whichever model it names (what quotes are made of)."""
    return svc.payments.quote_pricing


async def _database(svc: Annotated[NodeServices, Depends(services)]) -> sessionmaker[Session]:
    return svc.db


async def _catalog(svc: Annotated[NodeServices, Depends(services)]) -> AdapterCatalog:
    return svc.catalog


async def _engine(svc: Annotated[NodeServices, Depends(services)]) -> EngineClient:
    return svc.engine


async def _generation(svc: Annotated[NodeServices, Depends(services)]) -> GenerationService:
    return svc.generation


async def _metrics(svc: Annotated[NodeServices, Depends(services)]) -> APIMetrics:
    return svc.metrics


async def _trees(svc: Annotated[NodeServices, Depends(services)]) -> PublishedTrees:
    return svc.trees


async def _sources(svc: Annotated[NodeServices, Depends(services)]) -> EpochSources:
    return svc.sources


async def _split(svc: Annotated[NodeServices, Depends(services)]) -> SplitParams:
    if svc.split is None:
        raise Unavailable("this node was started without its deployment's split parameters")
    return svc.split


ServicesDep = Annotated[NodeServices, Depends(services)]
PaymentsDep = Annotated[PaymentService, Depends(_payments)]
NodeAddress = Annotated[str, Depends(_node_address)]  # the operator's checksummed address
LedgerDep = Annotated[Ledger, Depends(_ledger)]
PricingDep = Annotated[Pricing, Depends(_pricing)]
DatabaseDep = Annotated[sessionmaker[Session], Depends(_database)]
CatalogDep = Annotated[AdapterCatalog, Depends(_catalog)]
EngineDep = Annotated[EngineClient, Depends(_engine)]
GenerationDep = Annotated[GenerationService, Depends(_generation)]
MetricsDep = Annotated[APIMetrics, Depends(_metrics)]
SplitDep = Annotated[SplitParams, Depends(_split)]
TreesDep = Annotated[PublishedTrees, Depends(_trees)]
SourcesDep = Annotated[EpochSources, Depends(_sources)]
