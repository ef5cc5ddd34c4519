"""What an epoch collects and what is lost: the receipts a voucher still valid when the settle lands
covers, the lane's earlier losses that voucher recovers, and the losses recorded for the rest.

    collectible(session, node, epoch, valid_until) -> (covered, uncovered)   receipts, in id order
    lose(session, node, epoch, receipts, reason, detail)                     record them, take them out

A receipt whose lineageHash is not its adapter's registered lineage is lost at once (written off): its
fee is never split by another adapter's payees. Every function works in the caller's transaction.
"""

from __future__ import annotations

import logging

from sqlalchemy.orm import Session

from node.db.loss import LossReason, LossRecord, record_loss
from node.settlement import outbox
from node.settlement.epoch_builder import EpochReceipt
from node.settlement.epoch_builder import collectible as covered_by_vouchers

log = logging.getLogger(__name__)


def collectible(session: Session, node: str, epoch_id: int,
                valid_until: int) -> tuple[list[EpochReceipt], list[EpochReceipt]]:
    """(covered, uncovered) receipts of the epoch, in id order. The lost receipts of its lanes that
    the lane's best voucher valid at `valid_until` covers are recovered into it (that voucher signs
    over them: cumulative >= chargedTotal + maxFee); those it does not cover stay lost as they are."""
    receipts = outbox.epoch_receipts(session, node, epoch_id)
    wrong = outbox.misattributed(session, receipts)
    lose(session, node, epoch_id, wrong, LossReason.LINEAGE_MISMATCH, "its lineageHash is not its adapter's")
    wrong_ids = {r.receipt_id for r in wrong}
    receipts = [r for r in receipts if r.receipt_id not in wrong_ids]
    lost = outbox.lost_receipts(session, node, {r.lane_key for r in receipts})
    covered, uncovered = covered_by_vouchers(receipts + lost, valid_until)
    was_lost = {r.receipt_id for r in lost}
    recovered = [r for r in covered if r.receipt_id in was_lost]
    outbox.recover(session, node, epoch_id, recovered)
    if recovered:
        log.info("epoch %d recovers %d lost receipt(s), %d in fees", epoch_id, len(recovered),
                 sum(r.fee for r in recovered))
    return (sorted(covered, key=lambda r: r.receipt_id),
            [r for r in uncovered if r.receipt_id not in was_lost])


def lose(session: Session, node: str, epoch_id: int, receipts: list[EpochReceipt], reason: LossReason,
         detail: str) -> None:
    """Record each receipt as a loss and take it out of the epoch for good (a receipt the epoch
    recovered is lost again: its loss is already recorded)."""
    recorded = outbox.recovered_in(session, node, epoch_id)
    for r in receipts:
        if r.voucher_hash in recorded:
            continue
        record_loss(session, LossRecord(node, r.voucher.payer, r.voucher.lane, r.fee, reason, r.voucher_hash,
                                        epoch_id, detail))
    if receipts:
        outbox.detach(session, node, epoch_id, [r.receipt_id for r in receipts])
        log.warning("epoch %d: %d receipt(s), %d in fees, lost: %s", epoch_id, len(receipts),
                    sum(r.fee for r in receipts), reason.value)
