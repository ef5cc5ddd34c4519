"""Published settlements: an epoch's rewards and receipts trees, and one receipt's proof."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Path

from node.api.deps import DatabaseDep
from node.api.error_handlers import error_responses
from node.api.routes.info import ADDRESS, HASH, NotFound
from node.settlement.publication import epoch_document, published_epoch, receipt_proof

router = APIRouter(prefix="/v1", tags=["settlement"])
MAX_EPOCH_ID = 2**63  # epochs are stored as BIGINT; a larger id names no epoch


@router.get("/epochs/{node}/{epoch_id}", responses=error_responses(400, 404, 503))
def epoch(db: DatabaseDep, node: str = Path(..., pattern=ADDRESS.pattern),
          epoch_id: str = Path(..., pattern=r"^([0-9]{1,20}|latest)$", description="an epoch id, or `latest`")
          ) -> dict[str, Any]:
    """A settled epoch of `node` with its published trees (OpenZeppelin `standard-v1` dumps)."""
    wanted = None if epoch_id == "latest" else int(epoch_id)
    if wanted is not None and wanted >= MAX_EPOCH_ID:
        raise NotFound("no such settled epoch", node=node, epoch_id=epoch_id)
    with db() as session:
        row = published_epoch(session, node, wanted)
        if row is None:
            raise NotFound("no such settled epoch", node=node, epoch_id=epoch_id)
        return epoch_document(row)


@router.get("/receipts/{receipt_id}/proof", responses=error_responses(400, 404, 503))
def proof(db: DatabaseDep, receipt_id: str = Path(..., pattern=HASH.pattern)) -> dict[str, Any]:
    """The receipt's epoch, its leaf and its proof against the epoch's receipts root."""
    with db() as session:
        found = receipt_proof(session, receipt_id)
    if found is None:
        raise NotFound("the receipt is unknown or not settled yet", receipt_id=receipt_id)
    return found
