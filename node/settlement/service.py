"""The settlement worker's logic, without Celery: close epochs, build them, submit them, follow them.

Each node's epochs move through the outbox, and every step is persisted before the next one starts:

    OPEN       receipts up to a cutoff are assigned to the epoch (one transaction)
    BUILT      per lane, the best voucher still valid when the settle lands and what it covers, the
               lane's earlier lost receipts included (recovered); what no such voucher covers is a
               recorded loss; the rewards and receipts trees and their roots
    SUBMITTED  the `settle` was simulated (a lane that would revert, e.g. an escrow short of funds,
               becomes a recorded loss and the batch is rebuilt without it) and its intent is in the
               TxManager's store (saved before its broadcast); fee bumps and re-broadcasts after a crash
               or a reorg happen there
    CONFIRMED  mined (a reorg sends it back to SUBMITTED: the TxManager re-broadcasts it)
    FINAL      `finality_depth` blocks deep and the chain holds our roots for this epoch
    FAILED     the chain refused it after its preflight; the next tick rebuilds it (a new attempt) and
               hands the receipts of the epochs after it to later epochs: no operator needed

Epochs pipeline: the next one closes as soon as the previous is sent, and is sent as soon as the
previous is mined (its preflight then sees the chain after it), while the previous awaits finality.
Nonces keep them in order through a reorg; each builds on the previous one's stored cumulative tree.
At most one epoch waits unsent, which bounds the settle latency (node/settlement/latency.py).

`tick()` does the next thing for every epoch in flight under a database lock per node, so any number
of workers may call it, and a worker killed at any point leaves a state the next call continues from.
A `settle` the chain already holds with the same roots (sent before a crash lost the DB update)
counts as success.

When to close (`EpochPolicy`): there are receipts not in any epoch and the oldest is `max_age_s`
old, or they add up to `max_value`, or the soonest-expiring voucher among them expires within
`expiry_margin_s`. A voucher counts only if it is valid `land_within_s` after the build (chain time).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy.orm import Session, sessionmaker
from web3.exceptions import ContractLogicError

from node.chain.contracts import Contracts
from node.chain.tx_manager import TxManager, TxState
from node.chain.tx_store import db_lock
from node.db.loss import LossReason
from node.db.models import EpochState, SettlementEpoch
from node.errors import ChainError
from node.protocol.voucher import SignedVoucher
from node.settlement import collection, outbox
from node.settlement.amendment import ADOPT_HINT, check_follows_chain, follows_chain
from node.settlement.epoch_builder import build_epoch, cumulative_of
from node.settlement.latency import SettleLatency
from node.settlement.outbox import attempt_of, intent_key
from node.settlement.refusal import LaneRefusal, NotYet, refused_lane
from node.settlement.settle_call import epoch_matches, preflight, settle_calldata
from node.settlement.split import SplitParams

log = logging.getLogger(__name__)
MINED = (EpochState.CONFIRMED, EpochState.FINAL)
MAX_ATTEMPTS = 8  # rebuilds of a failed epoch before it waits for an operator, plus one per lane it lost


@dataclass(frozen=True)
class EpochPolicy:
    max_age_s: float = 3_600.0
    max_value: int | None = None
    expiry_margin_s: float = 120.0
    land_within_s: float = SettleLatency().build_to_land_s  # a voucher must outlive the build by this
    max_lanes: int = 200  # vouchers per settle (~53k gas each): far below a 30M-gas block


class SettlementService:
    def __init__(self, factory: sessionmaker[Session], contracts: Contracts, tx: TxManager,
                 policy: EpochPolicy = EpochPolicy(), clock: Callable[[], float] = time.time,
                 before_send: Callable[[SettlementEpoch], LaneRefusal | NotYet | None] | None = None,
                 on_tick: Callable[[], object] | None = None) -> None:
        self.factory = factory
        self.before_send = before_send  # x402: sweep the router's channels first (node/settlement/x402_sweep.py)
        self.on_tick = on_tick  # x402: claim withdrawing channels at once (node/settlement/x402_guard.py)
        self.contracts = contracts
        self.tx = tx
        self.node = tx.sender
        self.policy = policy
        self.clock = clock
        dep = contracts.deployment
        self.params = SplitParams(dep.treasury, self.node, dep.protocol_bps, dep.node_bps)

    # --- the loop -----------------------------------------------------------------------------------
    def tick(self) -> EpochState | None:
        """One beat: advance every epoch in flight, then close a new one when due. Idempotent.
        Returns the state of the newest epoch it moved."""
        with self._lock():
            try:
                state = self._advance()
                if self._may_close() and self.is_due():
                    epoch_id = self._close()
                    state = state if epoch_id is None else self._step_epoch(epoch_id)
                return state
            finally:  # after the epochs (a guard claim sent every tick cannot starve a sweep), even if they fail
                if self.on_tick is not None:
                    self.on_tick()

    def step(self) -> EpochState | None:
        """Advance the node's oldest unfinished epoch by one state; None when there is none."""
        with self._lock():
            self._recover()
            with self.factory() as session:
                row = outbox.unfinished(session, self.node)
            return None if row is None else self._step_epoch(row.epoch_id)

    def close_epoch(self) -> int | None:
        """Close an epoch now (whatever the policy says) if receipts wait and none waits unsent."""
        with self._lock():
            return self._close() if self._may_close() else None

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
        """At start: poll every open intent of the operator key but the settles (a tick follows those, after
        its staleness check), so nonces match the chain."""
        for key in [k for k in getattr(self.tx.store, "open_keys", lambda _s: [])(self.node) if k[:7] != "settle:"]:
            self.tx.poll(key)

    def _lock(self) -> AbstractContextManager[None]:
        return db_lock(self.factory.kw["bind"], f"epoch:{self.node.lower()}")

    def _advance(self) -> EpochState | None:
        self._recover()
        state = None
        with self.factory() as session:
            rows = outbox.in_flight(session, self.node)
            ids, followed = [r.epoch_id for r in rows], {intent_key(self.node, r.epoch_id, attempt_of(r)) for r in rows}
        self.tx.cancel_orphans("settle:", followed)  # an epoch adopt dissolved: its settle must never land
        for epoch_id in ids:
            state = self._step_epoch(epoch_id)
            if state is EpochState.FAILED:
                break
        return state

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

    def _may_close(self) -> bool:
        """No epoch failed (it is recovered first) and none is still unsent (OPEN or BUILT)."""
        with self.factory() as session:
            rows = outbox.in_flight(session, self.node)
            return outbox.failed(session, self.node) is None and all(
                r.state not in (EpochState.OPEN, EpochState.BUILT) for r in rows)

    def _close(self) -> int | None:
        with self.factory() as session, session.begin():
            p = outbox.pending(session, self.node)
            if p.max_receipt_id is None:
                return None
            epoch_id = outbox.last_epoch_id(session, self.node) + 1
            on_chain, final = self.contracts.settlement.last_epoch(self.node), outbox.last_final_epoch_id(
                session, self.node)
            if not final <= on_chain < epoch_id:  # the chain forgot epochs we settled: a guardian's amend
                raise ChainError(f"the chain's epochs do not follow this database's; if the guardian amended, "
                                 f"{ADOPT_HINT}", node=self.node, chain_last_epoch=on_chain,
                                 db_last_epoch=epoch_id - 1, db_last_final=final)
            count = outbox.open_epoch(session, self.node, epoch_id, p.max_receipt_id, self.policy.max_lanes)
            row = outbox.epoch_row(session, self.node, epoch_id)
            assert row is not None
            row.batch = {"attempt": self._fresh_attempt(epoch_id, 0)}
        log.info("epoch %d of %s opened with %d receipts", epoch_id, self.node, count)
        return epoch_id

    def _fresh_attempt(self, epoch_id: int, attempt: int) -> int:
        """The first attempt number from `attempt` whose intent key no earlier send has used."""
        while self.tx.store.load(intent_key(self.node, epoch_id, attempt)) is not None:
            attempt += 1
        return attempt

    # --- the state machine --------------------------------------------------------------------------
    def _step_epoch(self, epoch_id: int) -> EpochState | None:
        """Advance one epoch by one state; a BUILT epoch is sent only once every earlier one is mined."""
        with self.factory() as session:
            row = outbox.epoch_row(session, self.node, epoch_id)
            earlier = [r.state for r in outbox.in_flight(session, self.node) if r.epoch_id < epoch_id]
            if outbox.failed(session, self.node) is not None:
                earlier.append(EpochState.FAILED)  # nothing is sent past a failed epoch
        if row is None:
            return None
        if row.state is EpochState.OPEN:
            return self._build(epoch_id)
        if row.state is EpochState.BUILT:
            return self._submit(row) if all(s in MINED for s in earlier) else row.state
        if row.state in (EpochState.SUBMITTED, EpochState.CONFIRMED):
            return self._follow(row)
        return row.state

    def _build(self, epoch_id: int) -> EpochState | None:
        """Build the epoch from its receipts that a voucher valid when the settle lands still covers; the
        others become losses. An epoch left with nothing to collect is dissolved (None)."""
        valid_until = self._chain_time() + int(self.policy.land_within_s)
        with self.factory() as session, session.begin():
            row = outbox.epoch_row(session, self.node, epoch_id)
            assert row is not None and row.state is EpochState.OPEN
            covered, uncovered = collection.collectible(session, self.node, epoch_id, valid_until)
            collection.lose(session, self.node, epoch_id, uncovered, LossReason.VOUCHER_EXPIRED,
                            f"no voucher valid at {valid_until}")
            if not covered:
                outbox.dissolve(session, self.node, epoch_id)
                log.warning("epoch %d of %s dissolved: nothing left to collect", epoch_id, self.node)
                return None
            prev = outbox.epoch_row(session, self.node, epoch_id - 1)
            check_follows_chain(self.contracts.settlement, self.node, prev)  # never on a vetoed tree
            previous = cumulative_of(prev.trees["rewards"]) if prev and prev.trees else {}
            previous_total = (prev.rewards_total or 0) if prev else 0
            build = build_epoch(covered, outbox.lineages(session, covered), self.params, previous, previous_total,
                                valid_until)
            row.rewards_root, row.rewards_total = "0x" + build.rewards.root.hex(), build.rewards_total
            row.receipts_root, row.receipt_count = "0x" + build.receipts.root.hex(), build.receipt_count
            row.collected_total = build.collected
            row.trees = {"rewards": build.rewards.to_json(), "receipts": build.receipts.to_json()}
            row.batch = {"vouchers": [c.voucher.to_json() for c in build.lanes],
                         "amounts": [str(c.amount) for c in build.lanes], "attempt": attempt_of(row)}
            row.state, row.built_at = EpochState.BUILT, datetime.now(UTC)
        log.info("epoch %d built: %d lanes, collected %d, rewards total %d", epoch_id, len(build.lanes),
                 build.collected, build.rewards_total)
        return EpochState.BUILT

    def _chain_time(self) -> int:
        """The latest block's timestamp: what the contract compares voucher deadlines with."""
        w3 = self.contracts.settlement.client.w3
        return int(w3.eth.get_block("latest")["timestamp"])

    def _submit(self, row: SettlementEpoch) -> EpochState | None:
        key = intent_key(self.node, row.epoch_id, attempt_of(row))
        record = self.tx.store.load(key)
        if record is None:
            if epoch_matches(self.contracts.settlement, self.node, row):
                log.warning("epoch %d is already on chain with our roots: nothing to send", row.epoch_id)
                return self._save(row.epoch_id, EpochState.CONFIRMED)
            checked = self._swept(row)
            if isinstance(checked, SettlementEpoch):
                checked = self._preflight(checked)
            if not isinstance(checked, SettlementEpoch):
                return checked
            row = checked
            try:
                record = self.tx.send(key, self.contracts.settlement.address, settle_calldata(self.contracts.settlement,
                                                                                              row))
            except (ChainError, ContractLogicError) as exc:  # the chain moved since the preflight
                return self._refused(row, exc if isinstance(exc, ChainError) else ChainError(str(exc)))
        return self._save(row.epoch_id, EpochState.SUBMITTED, tx_hash=record.latest.tx_hash, nonce=record.nonce)

    def _swept(self, row: SettlementEpoch) -> SettlementEpoch | EpochState | None:
        """`before_send` done (x402 channels claimed into the router's escrow); a lane it refuses becomes a
        loss and the epoch is rebuilt without it."""
        for _ in range(len((row.batch or {}).get("vouchers", [])) + 1):
            refused = self.before_send(row) if self.before_send is not None else None
            if refused is None:
                return row
            if isinstance(refused, NotYet):  # its transactions are not mined yet: sent at a later tick
                return EpochState.BUILT
            if (rebuilt := self._without_lane(row.epoch_id, refused)) is None:
                return None
            row = rebuilt
        raise AssertionError("a batch cannot be refused more times than it has lanes")

    def _preflight(self, row: SettlementEpoch) -> SettlementEpoch | EpochState | None:
        """Simulate the settle; each lane that would revert becomes a loss and the epoch is rebuilt
        without it. The row that passes, or the state it ended in (FAILED, or None when dissolved)."""
        for _ in range(len((row.batch or {}).get("vouchers", [])) + 1):
            refusal = preflight(self.contracts.settlement, self.node, row)
            if refusal is None:
                return row
            assert row.batch is not None
            vouchers = [SignedVoucher.from_json(v) for v in row.batch["vouchers"]]
            lane = refused_lane(refusal, vouchers, [int(a) for a in row.batch["amounts"]])
            if lane is None:
                return self._refused(row, refusal)
            if (rebuilt := self._without_lane(row.epoch_id, lane)) is None:
                return None
            row = rebuilt
        raise AssertionError("a batch cannot be refused more times than it has lanes")

    def _without_lane(self, epoch_id: int, lane: LaneRefusal) -> SettlementEpoch | None:
        """The refused lane's receipts become losses; the epoch rebuilt without them (None: dissolved)."""
        with self.factory() as session, session.begin():
            row = outbox.epoch_row(session, self.node, epoch_id)
            assert row is not None
            receipts = [r for r in outbox.epoch_receipts(session, self.node, epoch_id)
                        if r.lane_key == (lane.payer, lane.lane)]
            collection.lose(session, self.node, epoch_id, receipts, lane.reason, lane.detail)
            row.state, row.batch, row.trees = EpochState.OPEN, {"attempt": attempt_of(row)}, None
        if self._build(epoch_id) is None:
            return None
        with self.factory() as session:
            rebuilt = outbox.epoch_row(session, self.node, epoch_id)
        assert rebuilt is not None
        return rebuilt

    def _refused(self, row: SettlementEpoch, exc: ChainError) -> EpochState:
        """The chain refuses the epoch as a whole (it may already hold it: then it is done)."""
        if epoch_matches(self.contracts.settlement, self.node, row):
            return self._save(row.epoch_id, EpochState.CONFIRMED)
        log.error("epoch %d refused by the chain: %s", row.epoch_id, exc.facts)
        return self._save(row.epoch_id, EpochState.FAILED, error=f"{exc}: {exc.facts}")

    # --- recovery -----------------------------------------------------------------------------------
    def _recover(self) -> None:
        """A FAILED epoch is rebuilt as a new attempt (its preflight then finds the lane at fault), once
        the sends of the epochs after it are settled (mined or failed: their nonces come first); those
        epochs are dissolved and their receipts wait for the next ones. A rebuild that moved a lane to a loss
        (a payer withdrew ahead of the settle) made progress: it does not use up one of the attempts."""
        with self.factory() as session:
            failed = outbox.failed(session, self.node)
            if failed is None or attempt_of(failed) + 1 >= MAX_ATTEMPTS + outbox.lanes_lost(session, self.node,
                                                                                            failed.epoch_id):
                return
            after = [(r.epoch_id, attempt_of(r)) for r in outbox.later(session, self.node, failed.epoch_id)]
        if epoch_matches(self.contracts.settlement, self.node, failed):  # it landed after all
            self._save(failed.epoch_id, EpochState.CONFIRMED)
            return
        if self.contracts.settlement.last_epoch(self.node) >= failed.epoch_id:  # never forget what landed
            raise ChainError("the chain holds an epoch this database marks failed", node=self.node,
                             epoch_id=failed.epoch_id)
        for epoch_id, attempt in after:
            key = intent_key(self.node, epoch_id, attempt)
            if self.tx.store.load(key) is not None and self.tx.poll(key).state is TxState.PENDING:
                return
        with self.factory() as session, session.begin():
            row = outbox.epoch_row(session, self.node, failed.epoch_id)
            assert row is not None
            for epoch_id, _ in reversed(after):
                outbox.dissolve(session, self.node, epoch_id)
            attempt = self._fresh_attempt(row.epoch_id, attempt_of(row) + 1)
            row.state, row.batch, row.trees = EpochState.OPEN, {"attempt": attempt}, None
            row.tx_hash = row.nonce = row.submitted_at = row.confirmed_at = None
        log.warning("epoch %d of %s failed: rebuilding it (attempt %d), %d later epoch(s) dissolved",
                    failed.epoch_id, self.node, attempt, len(after))

    def _follow(self, row: SettlementEpoch) -> EpochState:
        key = intent_key(self.node, row.epoch_id, attempt_of(row))
        if self.tx.store.load(key) is None:  # confirmed without a send of ours (found on chain)
            with self.factory() as session:
                final = outbox.is_final_on_mirror(session, self.node, row)
            return self._save(row.epoch_id, EpochState.FINAL if final else row.state)
        with self.factory() as session:  # built on leaves the guardian vetoed or replaced: it must never land
            previous = outbox.epoch_row(session, self.node, row.epoch_id - 1)
        if not follows_chain(self.contracts.settlement, self.node, previous):
            self.tx.cancel(key)  # before `poll` re-broadcasts it
        record = self.tx.poll(key)
        if record.state is TxState.PENDING:
            return self._save(row.epoch_id, EpochState.SUBMITTED, tx_hash=record.latest.tx_hash)
        if record.state is TxState.MINED:
            return self._save(row.epoch_id, EpochState.CONFIRMED, tx_hash=record.mined_hash)
        if record.state is TxState.FAILED and not epoch_matches(self.contracts.settlement, self.node, row):
            return self._save(row.epoch_id, EpochState.FAILED, error=record.error)
        if not epoch_matches(self.contracts.settlement, self.node, row):
            raise ChainError(f"a final settle left different roots on chain; if the guardian amended, {ADOPT_HINT}",
                             epoch_id=row.epoch_id)
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
