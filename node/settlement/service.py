"""The settlement worker's logic, without Celery: close epochs, build them, submit them, follow them.

Each node's epochs move through the outbox, and every step is persisted before the next one starts:

    OPEN       receipts up to a cutoff are assigned to the epoch (one transaction)
    BUILT      per lane, the best voucher still valid when the settle lands and what it covers, the
               lane's earlier lost receipts included (recovered); what no such voucher covers is a
               recorded loss; the rewards and receipts trees and their roots. With `token_per_eth` set,
               a built epoch whose collection no longer pays for its settle's gas at the price of the
               tick that would send it is dissolved instead (its receipts wait for a lower price)
    SUBMITTED  the `settle` was simulated (a lane that would revert, e.g. an escrow short of funds,
               becomes a recorded loss and the batch is rebuilt without it) and its intent is in the
               TxManager's store (saved before its broadcast); fee bumps and re-broadcasts after a crash
               or a reorg happen there, the fees never pricing its gas past what the epoch collects
               (with `token_per_eth` set: it waits in the pool for the price to fall instead)
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

When to close: `EpochPolicy` (node/settlement/policy.py). Each step lives in a module of its own:
build_step.py (OPEN -> BUILT), submit_step.py (BUILT -> SUBMITTED), follow_step.py (-> CONFIRMED ->
FINAL) and recovery.py (FAILED -> OPEN); this service closes epochs, runs the steps in order and records
each transition in the outbox (node/settlement/outbox.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager

from sqlalchemy.orm import Session, sessionmaker

from node.chain.contracts import Contracts
from node.chain.tx_manager import TxManager
from node.chain.tx_store import db_lock
from node.db.models import EpochState, SettlementEpoch
from node.errors import ChainError
from node.settlement import outbox
from node.settlement.amendment import ADOPT_HINT
from node.settlement.build_step import BuildStep
from node.settlement.follow_step import FollowStep
from node.settlement.outbox import Transition, attempt_of, fresh_attempt, intent_key
from node.settlement.policy import EpochPolicy, GasFloor
from node.settlement.recovery import Recovery
from node.settlement.split import SplitParams
from node.settlement.submit_step import BeforeSend, Outcome, SubmitStep

log = logging.getLogger(__name__)
MINED = (EpochState.CONFIRMED, EpochState.FINAL)


class SettlementService:
    def __init__(self, factory: sessionmaker[Session], contracts: Contracts, tx: TxManager,
                 policy: EpochPolicy = EpochPolicy(), clock: Callable[[], float] = time.time,
                 before_send: BeforeSend | None = None, on_tick: Callable[[], object] | None = None) -> None:
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
        settlement = contracts.settlement
        self.builder = BuildStep(factory, settlement, self.node, self.params, policy.land_within_s,
                                 policy.build_s)
        self.submitter = SubmitStep(settlement, tx, self.builder, before_send, policy.gas_budget_wei)
        self.follower = FollowStep(factory, settlement, tx, policy.gas_budget_wei)
        self.recovery = Recovery(factory, settlement, tx, policy.gas_budget_wei)

    # --- the loop -----------------------------------------------------------------------------------
    def tick(self) -> EpochState | None:
        """One beat: advance every epoch in flight, then close a new one when due. Idempotent.
        Returns the state of the newest epoch it moved."""
        with self._lock():
            try:
                floor = self.gas_floor()  # the chain's gas price, asked once a tick
                state = self._advance(floor)
                if self._may_close() and self.is_due(floor):
                    epoch_id = self._close(floor)
                    state = state if epoch_id is None else self._step_epoch(epoch_id, floor)
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
        for key in [k for k in self.tx.store.open_keys(self.node) if k[:7] != "settle:"]:
            self.tx.poll(key)

    def _lock(self) -> AbstractContextManager[None]:
        return db_lock(self.factory.kw["bind"], f"epoch:{self.node.lower()}")

    def _advance(self, floor: GasFloor) -> EpochState | None:
        self._recover()
        state = None
        with self.factory() as session:
            rows = outbox.in_flight(session, self.node)
            ids, followed = [r.epoch_id for r in rows], {intent_key(self.node, r.epoch_id, attempt_of(r)) for r in rows}
        self.tx.cancel_orphans("settle:", followed)  # an epoch adopt dissolved: its settle must never land
        for epoch_id in ids:
            state = self._step_epoch(epoch_id, floor)
            if state is EpochState.FAILED:
                break
        return state

    # --- closing ------------------------------------------------------------------------------------
    def is_due(self, floor: GasFloor | None = None) -> bool:
        """Whether an epoch should close now, at `floor` (the gas price now when not given)."""
        floor = self.gas_floor() if floor is None else floor
        with self.factory() as session:
            if floor == GasFloor():  # every lane is worth its gas: the epoch pays for itself
                pending = outbox.pending(session, self.node)
            else:  # judged on the lanes the epoch would take (those of payers that may withdraw first may wait)
                pending = outbox.pending(session, self.node, floor.lane, self.policy.max_lanes,
                                         self._may_withdraw_by(), floor.base)
        return self.policy.is_due(pending, self.clock(), floor, chain_now=self.builder.chain_time())

    def _may_withdraw_by(self) -> int:
        """When a settle sent now lands (chain time): a payer whose thaw ends by then may withdraw first."""
        return self.builder.chain_time() + int(self.policy.land_within_s)

    def gas_floor(self) -> GasFloor:
        """What a lane's voucher and a settle cost in gas now, in token units (zero unless `token_per_eth`)."""
        if self.policy.token_per_eth is None:
            return GasFloor()
        return self.policy.gas_floor(int(self.contracts.settlement.client.w3.eth.gas_price))

    def _may_close(self) -> bool:
        """No epoch failed (it is recovered first) and none is still unsent (OPEN or BUILT)."""
        with self.factory() as session:
            rows = outbox.in_flight(session, self.node)
            return outbox.failed(session, self.node) is None and all(
                r.state not in (EpochState.OPEN, EpochState.BUILT) for r in rows)

    def _close(self, floor: GasFloor | None = None) -> int | None:
        """Open the next epoch with the lanes worth their gas at `floor` (the gas price now when not given)."""
        floor = self.gas_floor() if floor is None else floor
        may_withdraw_by = self._may_withdraw_by()
        with self.factory() as session, session.begin():
            p = outbox.pending(session, self.node, floor.lane)
            if p.max_receipt_id is None:
                return None
            epoch_id = outbox.last_epoch_id(session, self.node) + 1
            on_chain, final = self.contracts.settlement.last_epoch(self.node), outbox.last_final_epoch_id(
                session, self.node)
            if not final <= on_chain < epoch_id:  # the chain forgot epochs we settled: a guardian's amend
                raise ChainError(f"the chain's epochs do not follow this database's; if the guardian amended, "
                                 f"{ADOPT_HINT}", node=self.node, chain_last_epoch=on_chain,
                                 db_last_epoch=epoch_id - 1, db_last_final=final)
            count = outbox.open_epoch(session, self.node, epoch_id, p.max_receipt_id, self.policy.max_lanes,
                                      floor.lane, may_withdraw_by, floor.base)
            if count == 0:  # only payers who may withdraw first, worth less than a settle of their own
                outbox.dissolve(session, self.node, epoch_id)
                return None
            row = outbox.epoch_row(session, self.node, epoch_id)
            assert row is not None
            row.batch = {"attempt": fresh_attempt(self.tx.store, self.node, epoch_id, 0)}
        log.info("epoch %d of %s opened with %d receipts", epoch_id, self.node, count)
        return epoch_id

    # --- the state machine --------------------------------------------------------------------------
    def _step_epoch(self, epoch_id: int, floor: GasFloor | None = None) -> EpochState | None:
        """Advance one epoch by one state; a BUILT epoch is sent only once every earlier one is mined, and
        only while what it collects pays for its settle at `floor` (the gas price now when not given)."""
        with self.factory() as session:
            row = outbox.epoch_row(session, self.node, epoch_id)
            earlier = [r.state for r in outbox.in_flight(session, self.node) if r.epoch_id < epoch_id]
            if outbox.failed(session, self.node) is not None:
                earlier.append(EpochState.FAILED)  # nothing is sent past a failed epoch
        if row is None:
            return None
        if row.state is EpochState.OPEN:
            return self.builder.build(epoch_id)
        if row.state is EpochState.BUILT:
            if not all(s in MINED for s in earlier):
                return row.state
            if self._priced_out(row, floor):
                return None
            return self._record(epoch_id, self.submitter.submit(row))
        if row.state in (EpochState.SUBMITTED, EpochState.CONFIRMED):
            return self._record(epoch_id, self.follower.follow(row))
        return row.state

    def _priced_out(self, row: SettlementEpoch, floor: GasFloor | None) -> bool:
        """Dissolve the built, never sent epoch `row` when what it collects no longer pays for its settle's gas
        at `floor` (the price rose since it closed): its receipts wait, nothing lost (vouchers are
        cumulative), and close again once the price lets them. True when dissolved."""
        if self.policy.token_per_eth is None or self.tx.store.load(intent_key(self.node, row.epoch_id,
                                                                              attempt_of(row))) is not None:
            return False
        floor = self.gas_floor() if floor is None else floor
        num_lanes = len((row.batch or {}).get("vouchers", []))
        if (row.collected_total or 0) >= floor.base + floor.lane * num_lanes:
            return False
        with self.factory() as session, session.begin():
            outbox.dissolve(session, self.node, row.epoch_id)
        log.warning("epoch %d of %s dissolved before its send: it collects %d, its settle now costs %d in gas "
                    "(token units); its receipts wait for a lower gas price", row.epoch_id, self.node,
                    row.collected_total or 0, floor.base + floor.lane * num_lanes)
        return True

    def _recover(self) -> None:
        landed = self.recovery.recover()
        if landed is not None:  # a failed epoch the chain holds after all
            self._save(landed, EpochState.CONFIRMED)

    def _record(self, epoch_id: int, outcome: Outcome) -> EpochState | None:
        """Record a step's transition; a state the step left as it was (or None: dissolved) passes through."""
        if not isinstance(outcome, Transition):
            return outcome
        return self._save(epoch_id, outcome.state, tx_hash=outcome.tx_hash, nonce=outcome.nonce, error=outcome.error)

    def _save(self, epoch_id: int, state: EpochState, *, tx_hash: str | None = None, nonce: int | None = None,
              error: str | None = None) -> EpochState:
        with self.factory() as session, session.begin():
            outbox.record(session, self.node, epoch_id, Transition(state, tx_hash, nonce, error))
        return state
