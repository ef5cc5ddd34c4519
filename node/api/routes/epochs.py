"""Settlement as anyone may watch it: a node's epochs, a settled epoch's trees, one receipt's proof,
and what an address earned."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from eth_utils import to_checksum_address
from fastapi import APIRouter, Path, Query, Response

from node.api.deps import DatabaseDep, SourcesDep, SplitDep, TreesDep
from node.api.error_handlers import error_responses
from node.api.routes.info import ADDRESS, HASH, NotFound
from node.settlement.earnings import MAX_PAGE, earnings_from
from node.settlement.epoch_report import MAX_LISTED, epoch_report, list_epochs
from node.settlement.publication import epoch_json, proof_in, published_epoch, settled_receipt

router = APIRouter(prefix="/v1", tags=["settlement"])
MAX_EPOCH_ID = 2**63  # epochs are stored as BIGINT; a larger id names no epoch
EPOCH_ID = r"^([0-9]{1,20}|latest)$"


def _wanted(node: str, epoch_id: str) -> int | None:
    wanted = None if epoch_id == "latest" else int(epoch_id)
    if wanted is not None and wanted >= MAX_EPOCH_ID:
        raise NotFound("no such epoch", node=node, epoch_id=epoch_id)
    return wanted


@router.get("/epochs/{node}", responses=error_responses(400, 503))
def epochs(db: DatabaseDep, node: str = Path(..., pattern=ADDRESS.pattern),
           limit: int = Query(50, ge=1, le=MAX_LISTED)) -> dict[str, Any]:
    """The node's newest epochs, newest first: state and times; once sent, receipt count, totals, roots
    and transaction."""
    with db() as session:
        return {"node": to_checksum_address(node), "epochs": list_epochs(session, node, limit)}


@router.get("/epochs/{node}/{epoch_id}/summary", responses=error_responses(400, 404, 503))
def epoch_summary(db: DatabaseDep, node: str = Path(..., pattern=ADDRESS.pattern),
                  epoch_id: str = Path(..., pattern=EPOCH_ID, description="an epoch id, or `latest`")
                  ) -> dict[str, Any]:
    """One epoch in any state (`epochs` above), with its losses per reason."""
    with db() as session:
        found = epoch_report(session, node, _wanted(node, epoch_id))
    if found is None:
        raise NotFound("no such epoch", node=node, epoch_id=epoch_id)
    return found


@router.get("/epochs/{node}/{epoch_id}", responses=error_responses(400, 404, 503))
def epoch(db: DatabaseDep, trees: TreesDep, node: str = Path(..., pattern=ADDRESS.pattern),
          epoch_id: str = Path(..., pattern=EPOCH_ID, description="an epoch id, or `latest`")) -> Response:
    """A settled epoch of `node` with its published trees (OpenZeppelin `standard-v1` dumps), as JSON encoded
    once per published epoch."""
    wanted = _wanted(node, epoch_id)
    with db() as session:
        row = published_epoch(session, node, wanted, with_trees=False)
    parsed = None if row is None else trees.get(db, row)
    if row is None or parsed is None:
        raise NotFound("no such settled epoch", node=node, epoch_id=epoch_id)
    return Response(epoch_json(row, parsed), media_type="application/json")


@router.get("/earnings/{node}/{account}", responses=error_responses(400, 503))
def earnings(db: DatabaseDep, split: SplitDep, trees: TreesDep, sources: SourcesDep,
             node: str = Path(..., pattern=ADDRESS.pattern),
             account: str = Path(..., pattern=ADDRESS.pattern),
             limit: int = Query(MAX_PAGE, ge=1, le=MAX_PAGE, description="published epochs looked at"),
             before: int | None = Query(None, ge=0, lt=MAX_EPOCH_ID, description="the previous page's `next`")
             ) -> dict[str, Any]:
    """What `account` earned from `node`'s settled epochs: in total, how much of it is claimed and claimable,
    and per epoch and per source (dataset, adapter owner, node, treasury) among the `limit` newest published
    epochs before `before`, oldest first; `next` is the `before` of the next page (`null` on the last)."""
    return earnings_from(db, trees, sources, replace(split, node=node), account, limit, before)


@router.get("/receipts/{receipt_id}/proof", responses=error_responses(400, 404, 503))
def proof(db: DatabaseDep, trees: TreesDep, receipt_id: str = Path(..., pattern=HASH.pattern)) -> dict[str, Any]:
    """The receipt's epoch, its leaf and its proof against the epoch's receipts root."""
    with db() as session:
        settled = settled_receipt(session, receipt_id)
    parsed = None if settled is None else trees.get(db, settled.epoch)
    found = None if settled is None or parsed is None else proof_in(settled, parsed)
    if found is None:
        raise NotFound("the receipt is unknown or not settled yet", receipt_id=receipt_id)
    return found
