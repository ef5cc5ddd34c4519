"""The node as the x402 facilitator of its own channels, where an external facilitator would be: a client
configured with `<node>/x402` as its facilitator URL calls `POST /x402/verify`, `POST /x402/settle` and
`GET /x402/supported` (the x402 facilitator interface; docs/x402.md)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import APIRouter, Request

from node.api.deps import GenerationDep
from node.api.error_handlers import error_responses
from node.api.request_body import read_body
from node.errors import BadRequest, NodeError
from node.payment.x402.facilitator import Facilitator

router = APIRouter(prefix="/x402", tags=["x402"])
MAX_BODY_BYTES = 64 * 1024
_REQUEST = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["x402Version", "paymentPayload", "paymentRequirements"],
    "properties": {"x402Version": {"type": "integer", "enum": [2]}, "paymentPayload": {"type": "object"},
                   "paymentRequirements": {"type": "object"}}}}}}}


class X402Off(NodeError):
    status = 404
    code = "x402_not_enabled"


def _facilitator(generation: GenerationDep) -> Facilitator:
    x402 = generation.x402
    if x402 is None or x402.facilitator is None:
        raise X402Off("this node takes no x402 payments (no LORANODE_X402_ROUTER)")
    return x402.facilitator


async def _body(request: Request) -> Any:
    raw = await read_body(request, MAX_BODY_BYTES)  # 413 before a byte past the limit is read
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:  # nested deeper than the API recurses (node/api/app.py)
        raise BadRequest("the body must be JSON: {x402Version, paymentPayload, paymentRequirements}") from exc


@router.get("/supported")
def supported(generation: GenerationDep) -> dict[str, Any]:
    """The kinds this facilitator settles: none on a node that takes no x402 payments."""
    x402 = generation.x402
    if x402 is None or x402.facilitator is None:
        return {"kinds": [], "extensions": [], "signers": {}}
    return x402.facilitator.supported()


@router.post("/verify", responses=error_responses(400, 404, 413), openapi_extra=_REQUEST)
async def verify(request: Request, generation: GenerationDep) -> dict[str, Any]:
    """`isValid` with the channel's on-chain snapshot in `extra`, or `invalidReason` (the spec's code)."""
    facilitator = _facilitator(generation)
    return await asyncio.to_thread(facilitator.verify, await _body(request))


@router.post("/settle", responses=error_responses(400, 404, 413), openapi_extra=_REQUEST)
async def settle(request: Request, generation: GenerationDep) -> dict[str, Any]:
    """A deposit submitted on chain (the node pays the gas): its transaction and the channel's new state."""
    facilitator = _facilitator(generation)
    return await asyncio.to_thread(facilitator.settle, await _body(request))
