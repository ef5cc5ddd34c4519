"""Published settlements: an epoch's rewards and receipts trees, and one receipt's proof."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Path

from node.api.deps import NodeServices, services
from node.api.routes.info import ADDRESS, HASH, NotFound
from node.errors import BadRequest
from node.settlement.publication import epoch_document, published_epoch, receipt_proof

router = APIRouter(prefix="/v1", tags=["settlement"])


@router.get("/epochs/{node}/{epoch_id}")
def epoch(node: str = Path(...), epoch_id: str = Path(..., description="an epoch id, or `latest`"),
          svc: NodeServices = Depends(services)) -> dict[str, Any]:
    """A settled epoch of `node` with its published trees (OpenZeppelin `standard-v1` dumps)."""
    if not ADDRESS.match(node):
        raise BadRequest("node must be a 0x address", param="node")
    if epoch_id != "latest" and not epoch_id.isdigit():
        raise BadRequest("epoch_id must be a positive integer or `latest`", param="epoch_id")
    wanted = None if epoch_id == "latest" else int(epoch_id)
    with svc.db() as session:
        row = published_epoch(session, node, wanted)
        if row is None:
            raise NotFound("no such settled epoch", node=node, epoch_id=epoch_id)
        return epoch_document(row)


@router.get("/receipts/{receipt_id}/proof")
def proof(receipt_id: str = Path(...), svc: NodeServices = Depends(services)) -> dict[str, Any]:
    """The receipt's epoch, its leaf and its proof against the epoch's receipts root."""
    if not HASH.match(receipt_id):
        raise BadRequest("receipt_id must be a 0x-hex hash", param="receipt_id")
    with svc.db() as session:
        found = receipt_proof(session, receipt_id)
    if found is None:
        raise NotFound("the receipt is unknown or not settled yet", receipt_id=receipt_id)
    return found
