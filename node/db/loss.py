"""Losses: money the node served but will not collect, each with its reason.

Every completion token that leaves the node is either charged (a receipt) or recorded here. The API
records a loss when an answer was delivered but its charge could not be committed; settlement records
one when a lane's voucher cannot be collected (expired before the transaction lands, escrow short,
refused by the contract). `loranode settle losses` lists them per payer.

A settlement loss is still owed: vouchers are cumulative per lane, so the payer's next voucher on that
lane signs over it (`cumulative >= chargedTotal + maxFee`), and the epoch that collects the lane with
it collects the lost receipts too (`recovered_epoch_id`). Until then the API keeps counting it against
the payer's escrow (it is in the lane's charged total), so that the escrow it is owed from is never
spent twice. A loss the contract refuses for another reason than time or funds (`settle_refused`) can
never be collected: it is written off, is never tried again, and stops counting against the escrow.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import ColumnElement, Connection, and_, select
from sqlalchemy.orm import Session

from node.db.models import Loss


class LossReason(enum.StrEnum):
    DELIVERED_UNCHARGED = "delivered_uncharged"  # tokens left the node; the charge could not be committed
    NODE_FAULT = "node_fault"  # tokens left the node, then the node failed the request: it charges nothing
    VOUCHER_EXPIRED = "voucher_expired"  # no voucher of the lane is still valid when the settle lands
    ESCROW_SHORT = "escrow_short"  # the payer's escrow no longer covers the lane's amount
    LINEAGE_MISMATCH = "lineage_mismatch"  # the receipt's lineageHash is not its adapter's registered lineage
    SETTLE_REFUSED = "settle_refused"  # the contract refuses the lane's voucher for another reason


RECOVERABLE = (LossReason.VOUCHER_EXPIRED, LossReason.ESCROW_SHORT)  # the lane's next voucher collects these
WRITTEN_OFF = (LossReason.SETTLE_REFUSED, LossReason.LINEAGE_MISMATCH)  # settlement losses never collected


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
    recovered_epoch_id: int | None = None  # collected later, in this epoch: no longer lost


def record_loss(session: Session, loss: LossRecord) -> None:
    """Add `loss` to the caller's transaction, all of it: a loss recorded as already recovered stays so."""
    assert loss.recovered_epoch_id is None or loss.epoch_id is not None, "only a settlement loss is recovered"
    session.add(Loss(node=loss.node.lower(), payer=loss.payer.lower(), lane=loss.lane, amount=loss.amount,
                     reason=loss.reason.value, voucher_hash=loss.voucher_hash, epoch_id=loss.epoch_id,
                     detail=loss.detail, recovered_epoch_id=loss.recovered_epoch_id))


def losses(session: Session, node: str, payer: str | None = None,
           include_recovered: bool = False) -> Sequence[LossRecord]:
    """The node's losses still lost (with the recovered ones too if asked), oldest first; only
    `payer`'s when given."""
    q = select(Loss).where(Loss.node == node.lower())
    if payer is not None:
        q = q.where(Loss.payer == payer.lower())
    if not include_recovered:
        q = q.where(Loss.recovered_epoch_id.is_(None))
    return [LossRecord(r.node, r.payer, r.lane, r.amount, LossReason(r.reason), r.voucher_hash, r.epoch_id,
                       r.detail, r.created_at, r.recovered_epoch_id)
            for r in session.scalars(q.order_by(Loss.id))]


def is_settlement_loss() -> ColumnElement[bool]:
    """A loss settlement recorded for a receipt (not yet recovered): the API's losses have no epoch."""
    return and_(Loss.epoch_id.is_not(None), Loss.recovered_epoch_id.is_(None))


def is_written_off() -> ColumnElement[bool]:
    """A settlement loss that can never be collected: it no longer counts against the payer's escrow."""
    return and_(is_settlement_loss(), Loss.reason.in_([r.value for r in WRITTEN_OFF]))


def written_off(session: Session | Connection, payer: str, node: str) -> dict[int, int]:
    """Per lane of (payer, node): what settlement wrote off for good (part of the lane's charged total
    that the chain will never collect)."""
    q = select(Loss.lane, Loss.amount).where(Loss.node == node.lower(), Loss.payer == payer.lower(), is_written_off())
    out: dict[int, int] = {}
    for lane, amount in session.execute(q):
        out[lane] = out.get(lane, 0) + amount
    return out
