"""A node's epochs as anyone may see them: state, receipt count, totals, transaction, roots, and
what settlement could not collect (`GET /v1/epochs/{node}`, `loranode epoch list|show`).

What is shown is what the chain shows once the `settle` is sent (SUBMITTED and later): its roots,
totals, receipt count and transaction. An epoch not sent yet (OPEN, BUILT) or refused (FAILED) shows
its state and times only: its figures are not public yet, and may change when it is rebuilt. Losses
are summed per reason (count and amount), never per payer: the chain does not show them.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime
from typing import Any

from eth_utils import to_checksum_address
from sqlalchemy import select
from sqlalchemy.orm import Session

from node.db.models import EpochState, Loss, SettledEpoch, SettlementEpoch
from node.settlement.published_trees import WITHOUT_TREES

SENT = (EpochState.SUBMITTED, EpochState.CONFIRMED, EpochState.FINAL)
MAX_LISTED = 500
FIGURES = ("receiptCount", "collected", "rewardsTotal", "rewardsRoot", "receiptsRoot", "txHash")


def _amount(value: int | None) -> str | None:
    return None if value is None else str(value)


def _iso(at: datetime | None) -> str | None:
    return None if at is None else at.isoformat()


def summary(row: SettlementEpoch, settled: SettledEpoch | None) -> dict[str, Any]:
    """One epoch: its state and times; once sent, its roots, totals, count and transaction; once the
    chain mirror has it, when it unlocks for claims and whether it was vetoed."""
    out: dict[str, Any] = {"node": to_checksum_address(row.node), "epochId": row.epoch_id, "state": row.state.value,
                           "openedAt": _iso(row.opened_at), "submittedAt": _iso(row.submitted_at),
                           "confirmedAt": _iso(row.confirmed_at), "finalizedAt": _iso(row.finalized_at)}
    if row.state in SENT:
        out.update(receiptCount=row.receipt_count, collected=_amount(row.collected_total),
                   rewardsTotal=_amount(row.rewards_total), rewardsRoot=row.rewards_root,
                   receiptsRoot=row.receipts_root, txHash=row.tx_hash)
    else:
        out.update(dict.fromkeys(FIGURES))
    out["onChain"] = None if settled is None else {
        "unlockAt": _iso(settled.unlock_at), "vetoed": settled.vetoed_block is not None,
        "isFinal": settled.is_final, "txHash": settled.tx_hash}
    return out


def _settled(session: Session, node: str, epoch_ids: list[int]) -> dict[int, SettledEpoch]:
    if not epoch_ids:
        return {}
    q = select(SettledEpoch).where(SettledEpoch.node == node.lower(), SettledEpoch.epoch_id.in_(epoch_ids))
    return {r.epoch_id: r for r in session.scalars(q)}


def list_epochs(session: Session, node: str, limit: int = 50) -> list[dict[str, Any]]:
    """The node's newest `limit` epochs, newest first."""
    q = (select(SettlementEpoch).options(*WITHOUT_TREES).where(SettlementEpoch.node == node.lower())
         .order_by(SettlementEpoch.epoch_id.desc()).limit(min(limit, MAX_LISTED)))
    rows = list(session.scalars(q))
    settled = _settled(session, node, [r.epoch_id for r in rows])
    return [summary(r, settled.get(r.epoch_id)) for r in rows]


def epoch_report(session: Session, node: str, epoch_id: int | None = None) -> dict[str, Any] | None:
    """Epoch `epoch_id` of `node` (the newest when None) with its losses; None if there is none."""
    q = select(SettlementEpoch).options(*WITHOUT_TREES).where(SettlementEpoch.node == node.lower())
    if epoch_id is not None:
        q = q.where(SettlementEpoch.epoch_id == epoch_id)
    row = session.scalars(q.order_by(SettlementEpoch.epoch_id.desc()).limit(1)).first()
    if row is None:
        return None
    out = summary(row, _settled(session, node, [row.epoch_id]).get(row.epoch_id))
    out["losses"] = losses_of(session, node, row.epoch_id)
    return out


def losses_of(session: Session, node: str, epoch_id: int) -> dict[str, Any]:
    """What settlement could not collect in this epoch, per reason (count, amount, how many a later
    epoch recovered), and what this epoch recovered of earlier losses."""
    lost = session.execute(select(Loss.reason, Loss.amount, Loss.recovered_epoch_id)
                           .where(Loss.node == node.lower(), Loss.epoch_id == epoch_id)).all()
    by_reason: dict[str, dict[str, int]] = defaultdict(lambda: {"count": 0, "amount": 0, "recovered": 0})
    for reason, amount, recovered_in in lost:
        entry = by_reason[reason]
        entry["count"] += 1
        entry["amount"] += amount
        entry["recovered"] += recovered_in is not None
    recovered = session.execute(select(Loss.amount).where(Loss.node == node.lower(),
                                                          Loss.recovered_epoch_id == epoch_id)).all()
    return {"byReason": [{"reason": reason, "count": e["count"], "amount": str(e["amount"]),
                          "recoveredLater": e["recovered"]} for reason, e in sorted(by_reason.items())],
            "recoveredHere": {"count": len(recovered), "amount": str(sum(a for (a,) in recovered))}}
