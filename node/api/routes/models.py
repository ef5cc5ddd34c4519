"""GET /v1/models and /v1/models/{model}: what a request's `model` may name, in OpenAI's shape.

The base model alone (its served name, charged at the base prices, receipts with adapter id 0) and every
adapter the node can serve: registered for this base model, final, not deprecated, not failed to load
here. An adapter's `parent` is the base model's id; `created` is its registration block (the mirror
keeps no block times), the base model's the time the node started serving it (unix seconds).
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Path
from pydantic import BaseModel, Field

from node.api.deps import CatalogDep, NodeAddress, PaymentsDep
from node.api.error_handlers import error_responses
from node.catalog import AdapterCatalog
from node.db.queries import AdapterLineageView
from node.payment.pricing import Pricing

router = APIRouter(prefix="/v1", tags=["models"])


class Prices(BaseModel):
    promptTokenPrice: str
    completionTokenPrice: str
    minFee: str


class DatasetShare(BaseModel):
    id: int
    weightBps: int


class Lineage(BaseModel):
    hash: str
    ownerShareBps: int
    datasets: list[DatasetShare]


class ModelCard(BaseModel):
    """OpenAI's Model, with what a paying client also needs: prices, and an adapter's lineage."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(description="an adapter's registration block; the base model's start (unix seconds)")
    owned_by: str = Field(description="an adapter's owner; the base model's: the node's operator")
    root: str | None
    parent: str | None = Field(description="the base model's id for an adapter; null for the base model")
    baseModelId: str
    prices: Prices
    registeredBlock: int | None = None
    lineage: Lineage | None = None
    weightsSha256: str | None = None
    uri: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


@router.get("/models", response_model=ModelList, responses=error_responses(503))
def models(catalog: CatalogDep, payments: PaymentsDep, node: NodeAddress) -> dict[str, Any]:
    """The base model first, then every servable adapter by id."""
    data = [] if catalog.base_model_name is None else [_base(catalog, payments.base_pricing, node)]
    data += [_adapter(catalog, view, payments.pricing) for view in catalog.served()]
    return {"object": "list", "data": data}


@router.get("/models/{model}", response_model=ModelCard, responses=error_responses(400, 404, 503))
def model(catalog: CatalogDep, payments: PaymentsDep, node: NodeAddress,
          model: str = Path(..., min_length=1, max_length=160)) -> dict[str, Any]:
    """One model as GET /v1/models lists it; 404 for a model this node does not serve."""
    view = catalog.describe(model)
    if view is not None:
        return _adapter(catalog, view, payments.pricing)
    return _base(catalog, payments.base_pricing, node)


def _base(catalog: AdapterCatalog, pricing: Pricing, node: str) -> dict[str, Any]:
    name = catalog.base_model_name
    assert name is not None, "describe() only answers None for the base model's name"
    return {"id": name, "object": "model", "created": catalog.started_at, "owned_by": node, "root": name,
            "parent": None, "baseModelId": catalog.base_model_id, "prices": _prices(pricing)}


def _adapter(catalog: AdapterCatalog, v: AdapterLineageView, pricing: Pricing) -> dict[str, Any]:
    return {"id": str(v.adapter_id), "object": "model", "created": v.registered_block, "owned_by": v.owner,
            "root": catalog.base_model_name, "parent": catalog.base_model_name,
            "baseModelId": catalog.base_model_id, "registeredBlock": v.registered_block,
            "lineage": {"hash": v.lineage_hash, "ownerShareBps": v.owner_share_bps,
                        "datasets": [{"id": d.dataset_id, "weightBps": d.weight_bps} for d in v.datasets]},
            "weightsSha256": v.weights_sha256, "uri": v.uri, "prices": _prices(pricing)}


def _prices(p: Pricing) -> dict[str, str]:
    return {"promptTokenPrice": str(p.prompt_token_price), "completionTokenPrice": str(p.completion_token_price),
            "minFee": str(p.min_fee)}
