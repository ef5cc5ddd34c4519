"""SUBMITTED -> CONFIRMED -> FINAL: a sent `settle` is followed until it is final or failed.

The TxManager polls it (fee bumps and re-broadcasts after a crash or a reorg happen there; a reorg sends
a mined settle back to SUBMITTED); its bumps stop at what the epoch collects (`budget`, with
`token_per_eth` set), past which it waits in the pool for the price to fall (unless a guard claim waits
behind its nonce: `_free_claims`). A settle built on leaves
the guardian vetoed or replaced is cancelled before it can land. A `settle` the chain already holds with
the same roots counts as success, final once the indexer sees it final when its intent was given up (a
receipt an RPC node hid is no proof of depth).
"""

from __future__ import annotations

import logging

from sqlalchemy.orm import Session, sessionmaker

from node.chain.contracts import Settlement
from node.chain.tx_manager import TxManager, TxState
from node.db.models import EpochState, SettlementEpoch
from node.errors import ChainError
from node.settlement import outbox
from node.settlement.amendment import ADOPT_HINT, follows_chain
from node.settlement.outbox import Transition, attempt_of, intent_key
from node.settlement.settle_call import epoch_matches
from node.settlement.submit_step import GasBudget
from node.settlement.x402_intents import PREFIX

log = logging.getLogger(__name__)
CLAIM_PREFIX = f"{PREFIX}collect:"  # the guard's claims (and an epoch's own, sent only once the one before it is mined)


class FollowStep:
    def __init__(self, factory: sessionmaker[Session], settlement: Settlement, tx: TxManager,
                 budget: GasBudget = lambda _c: None) -> None:
        self.factory = factory
        self.settlement = settlement
        self.tx = tx
        self.node = tx.sender
        self.budget = budget  # fee bumps stop at what the epoch collects: past that the settle waits

    def follow(self, row: SettlementEpoch) -> Transition:
        """What the epoch's settle is now, to record."""
        key = intent_key(self.node, row.epoch_id, attempt_of(row))
        if self.tx.store.load(key) is None:  # confirmed without a send of ours (found on chain)
            with self.factory() as session:
                final = outbox.is_final_on_mirror(session, self.node, row)
            return Transition(EpochState.FINAL if final else row.state)
        with self.factory() as session:  # built on leaves the guardian vetoed or replaced: it must never land
            previous = outbox.epoch_row(session, self.node, row.epoch_id - 1)
        if not follows_chain(self.settlement, self.node, previous):
            self.tx.cancel(key)  # before `poll` re-broadcasts it
        budget = self.budget(row.collected_total or 0)
        record = self.tx.poll(key, budget)
        if record.state is TxState.PENDING:
            self._free_claims(key, row.epoch_id, budget)
            return Transition(EpochState.SUBMITTED, tx_hash=record.latest.tx_hash)
        if record.state is TxState.MINED:
            return Transition(EpochState.CONFIRMED, tx_hash=record.mined_hash)
        if record.state is TxState.FAILED and not epoch_matches(self.settlement, self.node, row):
            return Transition(EpochState.FAILED, error=record.error)
        if not epoch_matches(self.settlement, self.node, row):
            raise ChainError(f"a final settle left different roots on chain; if the guardian amended, {ADOPT_HINT}",
                             epoch_id=row.epoch_id)
        if record.state is TxState.FAILED:  # given up (its receipt not found), yet the chain holds our roots:
            with self.factory() as session:  # final only once the indexer sees it final (a reorg may drop it)
                final = outbox.is_final_on_mirror(session, self.node, row)
            return Transition(EpochState.FINAL if final else EpochState.CONFIRMED)
        return Transition(EpochState.FINAL, tx_hash=record.mined_hash)

    def _free_claims(self, key: str, epoch_id: int, budget: int | None) -> None:
        """A settle waiting at its cap (the price outran what its epoch collects) holds the guard's claims
        behind its nonce; a claim must land before its payer's withdrawal finishes, so the settle's nonce
        goes to a no-op (21,000 gas) and the queue moves. The epoch then fails and is rebuilt (recovery.py),
        dissolved while the price stays above what it collects: its receipts wait, nothing lost."""
        if budget is None:  # capped only by `max_fee_cap`, as the claims are: a cancel would not free them
            return
        claims = self.tx.waiting_behind(key, CLAIM_PREFIX)
        if claims and self.tx.stuck_at_cap(key, budget):
            log.warning("epoch %d: its settle waits at its fee cap with %d x402 claim(s) behind its nonce: "
                        "cancelling it so they land (the epoch is rebuilt later)", epoch_id, len(claims))
            self.tx.cancel(key)
