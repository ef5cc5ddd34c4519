"""FAILED -> OPEN: a failed epoch is rebuilt as a new attempt, no operator needed.

The rebuild waits until the sends of the epochs after it are settled (mined or failed: their nonces come
first); those epochs are dissolved and their receipts wait for the next ones. The new attempt's preflight
then finds the lane at fault. After `MAX_ATTEMPTS` refusals, plus one per lane a rebuild moved to a loss
(a payer that withdrew ahead of the settle: that rebuild made progress), the epoch waits for an operator.
An attempt the node cancelled itself (a no-op took its nonce: a settle waiting at its fee cap with the
guard's claim behind it, or one built on vetoed leaves) is no refusal of the epoch by the chain and does not
count: a gas spike that comes back with a withdrawing payer each time must not stop settlement.
"""

from __future__ import annotations

import logging

from sqlalchemy.orm import Session, sessionmaker

from node.chain.contracts import Settlement
from node.chain.tx_manager import TxManager, TxRecord, TxState, TxStore
from node.db.models import EpochState
from node.errors import ChainError
from node.settlement import outbox
from node.settlement.outbox import attempt_of, fresh_attempt, intent_key
from node.settlement.settle_call import epoch_matches
from node.settlement.submit_step import GasBudget

log = logging.getLogger(__name__)
MAX_ATTEMPTS = 8  # rebuilds of a failed epoch before it waits for an operator, plus one per lane it lost


class Recovery:
    def __init__(self, factory: sessionmaker[Session], settlement: Settlement, tx: TxManager,
                 budget: GasBudget = lambda _c: None) -> None:
        self.factory = factory
        self.settlement = settlement
        self.tx = tx
        self.node = tx.sender
        self.budget = budget  # a later epoch's settle polled here is bumped no further than it collects

    def recover(self) -> int | None:
        """Reopen the failed epoch as a new attempt when it may be. Its id when the chain holds it after
        all (the caller records it CONFIRMED); None otherwise."""
        with self.factory() as session:
            failed = outbox.failed(session, self.node)
            if failed is None or refusals(self.tx.store, self.node, failed.epoch_id, attempt_of(failed)) >= (
                    MAX_ATTEMPTS + outbox.lanes_lost(session, self.node, failed.epoch_id)):
                return None
            after = [(r.epoch_id, attempt_of(r), self.budget(r.collected_total or 0))
                     for r in outbox.later(session, self.node, failed.epoch_id)]
        if epoch_matches(self.settlement, self.node, failed):  # it landed after all
            return failed.epoch_id
        if self.settlement.last_epoch(self.node) >= failed.epoch_id:  # never forget what landed
            raise ChainError("the chain holds an epoch this database marks failed", node=self.node,
                             epoch_id=failed.epoch_id)
        for epoch_id, attempt, budget in after:
            key = intent_key(self.node, epoch_id, attempt)
            if self.tx.store.load(key) is not None and self.tx.poll(key, budget).state is TxState.PENDING:
                return None
        with self.factory() as session, session.begin():
            row = outbox.epoch_row(session, self.node, failed.epoch_id)
            assert row is not None
            for epoch_id, _, _ in reversed(after):
                outbox.dissolve(session, self.node, epoch_id)
            attempt = fresh_attempt(self.tx.store, self.node, row.epoch_id, attempt_of(row) + 1)
            row.state, row.batch, row.trees = EpochState.OPEN, {"attempt": attempt}, None
            row.tx_hash = row.nonce = row.submitted_at = row.confirmed_at = None
        log.warning("epoch %d of %s failed: rebuilding it (attempt %d), %d later epoch(s) dissolved",
                    failed.epoch_id, self.node, attempt, len(after))
        return None


def refusals(store: TxStore, node: str, epoch_id: int, attempt: int) -> int:
    """How many of attempts 0..`attempt` of the epoch failed by the chain's doing: all but those a no-op of
    the node's took the nonce of (an attempt refused before it was sent has no record and counts)."""
    return attempt + 1 - sum(_cancelled(store.load(intent_key(node, epoch_id, a))) for a in range(attempt + 1))


def _cancelled(record: TxRecord | None) -> bool:
    return record is not None and record.state is TxState.FAILED and record.mined_hash is not None and any(
        a.is_cancel and a.tx_hash.lower() == record.mined_hash.lower() for a in record.attempts)
