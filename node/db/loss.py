"""Losses: money the node served but will not collect, each with its reason.

Every completion token that leaves the node is either charged (a receipt) or recorded here. The API
records a loss when an answer was delivered but its charge could not be committed; settlement records
one when a lane's voucher cannot be collected (expired before the transaction lands, escrow short,
refused by the contract). `loranode settle losses` lists them per payer.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from node.db.models import Loss


class LossReason(enum.StrEnum):
    DELIVERED_UNCHARGED = "delivered_uncharged"  # tokens left the node; the charge could not be committed
    NODE_FAULT = "node_fault"  # tokens left the node, then the node failed the request: it charges nothing
    VOUCHER_EXPIRED = "voucher_expired"  # no voucher of the lane is still valid when the settle lands
    ESCROW_SHORT = "escrow_short"  # the payer's escrow no longer covers the lane's amount
    LINEAGE_MISMATCH = "lineage_mismatch"  # the receipt's lineageHash is not its adapter's registered lineage
    SETTLE_REFUSED = "settle_refused"  # the contract refuses the lane's voucher for another reason


@dataclass(frozen=True)
class LossRecord:
    node: str
    payer: str
    lane: int
    amount: int
    reason: LossReason
    voucher_hash: str | None = None
    epoch_id: int | None = None
    detail: str | None = None
    created_at: datetime | None = None


def record_loss(session: Session, loss: LossRecord) -> None:
    """Add `loss` to the caller's transaction."""
    session.add(Loss(node=loss.node.lower(), payer=loss.payer.lower(), lane=loss.lane, amount=loss.amount,
                     reason=loss.reason.value, voucher_hash=loss.voucher_hash, epoch_id=loss.epoch_id,
                     detail=loss.detail))


def losses(session: Session, node: str, payer: str | None = None) -> Sequence[LossRecord]:
    """The node's losses, oldest first; only `payer`'s when given."""
    q = select(Loss).where(Loss.node == node.lower())
    if payer is not None:
        q = q.where(Loss.payer == payer.lower())
    return [LossRecord(r.node, r.payer, r.lane, r.amount, LossReason(r.reason), r.voucher_hash, r.epoch_id,
                       r.detail, r.created_at)
            for r in session.scalars(q.order_by(Loss.id))]
