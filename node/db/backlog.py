"""What is still owed or still on its way, as the node's own database says: the figures an operator
watches on settlement, the indexer and the transaction manager (exported by /metrics at each scrape)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from node.db.models import EpochState, IndexerCursor, Receipt, SettlementEpoch, TxIntent


@dataclass(frozen=True)
class Backlog:
    num_unsettled_epochs: int  # epochs holding receipts that are not final yet (receipts in none: one)
    num_failed_epochs: int
    num_pending_receipts: int  # receipts in no final epoch
    unsettled_value: int  # their fees, in the payment token's base units
    indexer_lag_blocks: int | None  # chain head at the indexer's last step minus the last indexed block
    indexer_step_age_s: float | None  # seconds since the indexer last reached the chain
    num_pending_txs: int  # transaction intents broadcast and not yet mined
    num_fee_bumps: int  # replacement attempts (same nonce, higher fee) over all intents


def read_backlog(session: Session, node: str) -> Backlog:
    unsettled = and_(SettlementEpoch.node == node, SettlementEpoch.state != EpochState.FINAL)  # failed ones count
    epochs = {EpochState(state): n for state, n in session.execute(
        select(SettlementEpoch.state, func.count()).where(unsettled).group_by(SettlementEpoch.state)).all()}
    pending = session.execute(
        select(func.count(), func.amount_total(Receipt.fee),
               func.count(func.distinct(func.coalesce(Receipt.epoch_id, -1))))
        .outerjoin(SettlementEpoch, and_(SettlementEpoch.node == Receipt.node,
                                         SettlementEpoch.epoch_id == Receipt.epoch_id))
        .where(Receipt.node == node, or_(SettlementEpoch.id.is_(None), SettlementEpoch.state != EpochState.FINAL))
    ).one()
    cursor = session.scalars(select(IndexerCursor)).first()
    lag = age = None
    if cursor is not None and cursor.head_block is not None:
        lag = max(0, cursor.head_block - cursor.last_block)
    if cursor is not None and cursor.checked_at is not None:
        age = (datetime.now(UTC) - cursor.checked_at).total_seconds()
    mine = TxIntent.sender == node
    num_pending_txs = session.scalar(select(func.count()).where(mine, TxIntent.state == "pending")) or 0
    num_attempts = func.json_array_length(TxIntent.attempts)  # counted in the database: a settle's carry its vouchers
    bumps = session.scalar(select(func.coalesce(func.sum(num_attempts - 1), 0)).where(mine, num_attempts > 1)) or 0
    return Backlog(num_unsettled_epochs=int(pending[2]), num_failed_epochs=epochs.get(EpochState.FAILED, 0),
                   num_pending_receipts=int(pending[0]), unsettled_value=int(pending[1] or 0),
                   indexer_lag_blocks=lag, indexer_step_age_s=age, num_pending_txs=int(num_pending_txs),
                   num_fee_bumps=int(bumps))
