"""The settlement worker's logic, without Celery: close an epoch, build it, submit it, follow it.

Each node's epochs move through the outbox one at a time, and every step is persisted before the
next one starts:

    OPEN       receipts up to a cutoff are assigned to the epoch (one transaction)
    BUILT      lane amounts, vouchers, the rewards and receipts trees and their roots are stored
    SUBMITTED  the `settle` intent "settle:<node>:<epoch>" is in the TxManager's store (saved before
               its broadcast); fee bumps and re-broadcasts after a crash or a reorg happen there
    CONFIRMED  mined (a reorg sends it back to SUBMITTED: the TxManager re-broadcasts it)
    FINAL      `finality_depth` blocks deep and the chain holds our roots for this epoch
    FAILED     the chain refused it (e.g. an expired voucher); closing stops until an operator acts

`step()` does the one next thing under a database lock per node, so any number of workers may call
it, and a worker killed at any point leaves a state the next `step()` continues from. A `settle` the
chain already holds with the same roots (sent before a crash lost the DB update) counts as success.

When to close (`EpochPolicy`): there are receipts not in any epoch and the oldest is `max_age_s`
old, or they add up to `max_value`, or the soonest-expiring voucher among them expires within
`expiry_margin_s` (settle reverts on an expired voucher; keep the API's `min_voucher_validity_s`
above `expiry_margin_s` + the beat interval + the time to mine, so every voucher gets settled in time).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy.orm import Session, sessionmaker
from web3.exceptions import ContractLogicError

from node.chain.contracts import Contracts
from node.chain.tx_manager import TxManager, TxState
from node.chain.tx_store import db_lock
from node.db.models import EpochState, SettlementEpoch
from node.errors import ChainError
from node.settlement import outbox
from node.settlement.epoch_builder import build_epoch, cumulative_of
from node.settlement.settle_call import epoch_matches, preflight, settle_calldata
from node.settlement.split import SplitParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EpochPolicy:
    max_age_s: float = 3_600.0
    max_value: int | None = None
    expiry_margin_s: float = 120.0


def intent_key(node: str, epoch_id: int) -> str:
    return f"settle:{node.lower()}:{epoch_id}"


class SettlementService:
    def __init__(self, factory: sessionmaker[Session], contracts: Contracts, tx: TxManager,
                 policy: EpochPolicy = EpochPolicy(), clock: Callable[[], float] = time.time) -> None:
        self.factory = factory
        self.contracts = contracts
        self.tx = tx
        self.node = tx.sender
        self.policy = policy
        self.clock = clock
        dep = contracts.deployment
        self.params = SplitParams(dep.treasury, self.node, dep.protocol_bps, dep.node_bps)

    # --- the loop -----------------------------------------------------------------------------------
    def tick(self) -> EpochState | None:
        """One beat: advance the epoch in flight, else close a new one when due. Idempotent."""
        with db_lock(self.factory.kw["bind"], f"epoch:{self.node.lower()}"):
            state = self._step()
            if state is None and self.is_due():
                epoch_id = self._close()
                state = None if epoch_id is None else self._step()
            return state

    def step(self) -> EpochState | None:
        """Advance the node's oldest unfinished epoch by one state; None when there is none."""
        with db_lock(self.factory.kw["bind"], f"epoch:{self.node.lower()}"):
            return self._step()

    def close_epoch(self) -> int | None:
        """Close an epoch now (whatever the policy says) if receipts wait and none is in flight."""
        with db_lock(self.factory.kw["bind"], f"epoch:{self.node.lower()}"):
            return self._close()

    def run_until_final(self, epoch_id: int, timeout_s: float = 60.0, interval_s: float = 0.1) -> EpochState:
        """Step until `epoch_id` is FINAL or FAILED (CLIs, tests, the demo)."""
        deadline = time.monotonic() + timeout_s
        while True:
            state = self.state(epoch_id)
            if state in (EpochState.FINAL, EpochState.FAILED):
                return state
            if time.monotonic() > deadline:
                raise ChainError("epoch not final in time", epoch_id=epoch_id, state=str(state))
            self.step()
            time.sleep(interval_s)

    def state(self, epoch_id: int) -> EpochState | None:
        with self.factory() as session:
            row = outbox.epoch_row(session, self.node, epoch_id)
            return None if row is None else row.state

    def reconcile(self) -> None:
        """At start: poll every open intent of the operator key, so nonces match the chain again."""
        store = self.tx.store
        for key in getattr(store, "open_keys", lambda _s: [])(self.node):
            self.tx.poll(key)

    # --- closing ------------------------------------------------------------------------------------
    def is_due(self) -> bool:
        with self.factory() as session:
            p = outbox.pending(session, self.node)
        if p.num_receipts == 0 or p.oldest_at is None or p.earliest_deadline is None:
            return False
        now = self.clock()
        age = now - p.oldest_at.astimezone(UTC).timestamp()
        by_value = self.policy.max_value is not None and p.total_fee >= self.policy.max_value
        return age >= self.policy.max_age_s or by_value or p.earliest_deadline <= now + self.policy.expiry_margin_s

    def _close(self) -> int | None:
        with self.factory() as session, session.begin():
            if outbox.unfinished(session, self.node) or outbox.failed(session, self.node):
                return None
            p = outbox.pending(session, self.node)
            if p.max_receipt_id is None:
                return None
            epoch_id = outbox.last_epoch_id(session, self.node) + 1
            on_chain = self.contracts.settlement.last_epoch(self.node)
            if on_chain != epoch_id - 1:
                raise ChainError("the chain's epochs do not follow this database's", node=self.node,
                                 chain_last_epoch=on_chain, db_last_epoch=epoch_id - 1)
            count = outbox.open_epoch(session, self.node, epoch_id, p.max_receipt_id)
        log.info("epoch %d of %s opened with %d receipts", epoch_id, self.node, count)
        return epoch_id

    # --- the state machine --------------------------------------------------------------------------
    def _step(self) -> EpochState | None:
        with self.factory() as session:
            row = outbox.unfinished(session, self.node)
        if row is None:
            return None
        if row.state is EpochState.OPEN:
            return self._build(row.epoch_id)
        if row.state is EpochState.BUILT:
            return self._submit(row)
        return self._follow(row)

    def _build(self, epoch_id: int) -> EpochState:
        with self.factory() as session, session.begin():
            row = outbox.epoch_row(session, self.node, epoch_id)
            assert row is not None and row.state is EpochState.OPEN
            receipts = outbox.epoch_receipts(session, self.node, epoch_id)
            prev = outbox.epoch_row(session, self.node, epoch_id - 1)
            previous = cumulative_of(prev.trees["rewards"]) if prev and prev.trees else {}
            previous_total = (prev.rewards_total or 0) if prev else 0
            build = build_epoch(receipts, outbox.lineages(session, receipts), self.params, previous, previous_total)
            row.rewards_root, row.rewards_total = "0x" + build.rewards.root.hex(), build.rewards_total
            row.receipts_root, row.receipt_count = "0x" + build.receipts.root.hex(), build.receipt_count
            row.collected_total = build.collected
            row.trees = {"rewards": build.rewards.to_json(), "receipts": build.receipts.to_json()}
            row.batch = {"vouchers": [c.voucher.to_json() for c in build.lanes],
                         "amounts": [str(c.amount) for c in build.lanes]}
            row.state, row.built_at = EpochState.BUILT, datetime.now(UTC)
        log.info("epoch %d built: %d lanes, collected %d, rewards total %d", epoch_id, len(build.lanes),
                 build.collected, build.rewards_total)
        return EpochState.BUILT

    def _submit(self, row: SettlementEpoch) -> EpochState:
        key = intent_key(self.node, row.epoch_id)
        record = self.tx.store.load(key)
        if record is None:
            if epoch_matches(self.contracts.settlement, self.node, row):
                log.warning("epoch %d is already on chain with our roots: nothing to send", row.epoch_id)
                return self._save(row.epoch_id, EpochState.CONFIRMED)
            refusal = preflight(self.contracts.settlement, self.node, row)
            if refusal is not None:
                return self._refused(row, refusal)
            data = settle_calldata(self.contracts.settlement, row)
            try:
                record = self.tx.send(key, self.contracts.settlement.address, data)
            except (ChainError, ContractLogicError) as exc:  # the chain moved since the preflight
                return self._refused(row, exc if isinstance(exc, ChainError) else ChainError(str(exc)))
        return self._save(row.epoch_id, EpochState.SUBMITTED, tx_hash=record.latest.tx_hash, nonce=record.nonce)

    def _refused(self, row: SettlementEpoch, exc: ChainError) -> EpochState:
        """Gas estimation reverted: the chain may already hold this epoch (then it is done)."""
        if epoch_matches(self.contracts.settlement, self.node, row):
            return self._save(row.epoch_id, EpochState.CONFIRMED)
        log.error("epoch %d refused by the chain: %s", row.epoch_id, exc.facts)
        return self._save(row.epoch_id, EpochState.FAILED, error=f"{exc}: {exc.facts}")

    def _follow(self, row: SettlementEpoch) -> EpochState:
        key = intent_key(self.node, row.epoch_id)
        if self.tx.store.load(key) is None:  # confirmed without a send of ours (found on chain)
            with self.factory() as session:
                final = outbox.is_final_on_mirror(session, self.node, row)
            return self._save(row.epoch_id, EpochState.FINAL if final else row.state)
        record = self.tx.poll(key)
        if record.state is TxState.PENDING:
            return self._save(row.epoch_id, EpochState.SUBMITTED, tx_hash=record.latest.tx_hash)
        if record.state is TxState.MINED:
            return self._save(row.epoch_id, EpochState.CONFIRMED, tx_hash=record.mined_hash)
        if record.state is TxState.FAILED and not epoch_matches(self.contracts.settlement, self.node, row):
            return self._save(row.epoch_id, EpochState.FAILED, error=record.error)
        if not epoch_matches(self.contracts.settlement, self.node, row):
            raise ChainError("a final settle left different roots on chain", epoch_id=row.epoch_id)
        return self._save(row.epoch_id, EpochState.FINAL, tx_hash=record.mined_hash)

    def _save(self, epoch_id: int, state: EpochState, *, tx_hash: str | None = None, nonce: int | None = None,
              error: str | None = None) -> EpochState:
        with self.factory() as session, session.begin():
            row = outbox.epoch_row(session, self.node, epoch_id)
            assert row is not None
            if row.state != state:
                log.info("epoch %d of %s: %s -> %s", epoch_id, self.node, row.state.value, state.value)
            now = datetime.now(UTC)
            stamps = {EpochState.SUBMITTED: "submitted_at", EpochState.CONFIRMED: "confirmed_at",
                      EpochState.FINAL: "finalized_at"}
            if state in stamps and getattr(row, stamps[state]) is None:
                setattr(row, stamps[state], now)
            row.state = state
            row.tx_hash = tx_hash or row.tx_hash
            row.nonce = row.nonce if nonce is None else nonce
            row.error = error or row.error
        return state
