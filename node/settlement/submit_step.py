"""BUILT -> SUBMITTED: an epoch's `settle` is checked, simulated and handed to the TxManager.

`before_send` runs first (x402: the router's channels are claimed into its escrow); then the preflight
simulates the settle. A lane either of them refuses becomes a loss and the epoch is rebuilt without it;
a refusal that names no lane fails the epoch (unless the chain already holds it: then it is done). The
intent is saved in the TxManager's store before its broadcast, so a crash never sends it twice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from web3.exceptions import ContractLogicError

from node.chain.contracts import Settlement
from node.chain.tx_manager import TxManager
from node.db.models import EpochState, SettlementEpoch
from node.errors import ChainError
from node.protocol.voucher import SignedVoucher
from node.settlement.build_step import BuildStep
from node.settlement.outbox import Transition, attempt_of, intent_key
from node.settlement.refusal import LaneRefusal, NotYet, refused_lane
from node.settlement.settle_call import epoch_matches, preflight, settle_calldata

log = logging.getLogger(__name__)
BeforeSend = Callable[[SettlementEpoch], LaneRefusal | NotYet | None]
GasBudget = Callable[[int], int | None]  # an epoch's collection -> the most wei its settle's gas may cost
Outcome = Transition | EpochState | None  # a state to record, or the state it is in (None: dissolved)


class SubmitStep:
    def __init__(self, settlement: Settlement, tx: TxManager, builder: BuildStep,
                 before_send: BeforeSend | None = None, budget: GasBudget = lambda _c: None) -> None:
        self.settlement = settlement
        self.tx = tx
        self.node = tx.sender
        self.builder = builder
        self.before_send = before_send
        self.budget = budget  # the settle's fees never price its gas past what the epoch collects

    def submit(self, row: SettlementEpoch) -> Outcome:
        key = intent_key(self.node, row.epoch_id, attempt_of(row))
        record = self.tx.store.load(key)
        if record is None:
            if epoch_matches(self.settlement, self.node, row):
                log.warning("epoch %d is already on chain with our roots: nothing to send", row.epoch_id)
                return Transition(EpochState.CONFIRMED)
            checked = self._swept(row)
            if isinstance(checked, SettlementEpoch):
                checked = self._preflight(checked)
            if not isinstance(checked, SettlementEpoch):
                return checked
            row = checked
            try:
                record = self.tx.send(key, self.settlement.address, settle_calldata(self.settlement, row),
                                      max_cost_wei=self.budget(row.collected_total or 0))
            except (ChainError, ContractLogicError) as exc:  # the chain moved since the preflight
                return self.refused(row, exc if isinstance(exc, ChainError) else ChainError(str(exc)))
        return Transition(EpochState.SUBMITTED, tx_hash=record.latest.tx_hash, nonce=record.nonce)

    def refused(self, row: SettlementEpoch, exc: ChainError) -> Transition:
        """The chain refuses the epoch as a whole (it may already hold it: then it is done)."""
        if epoch_matches(self.settlement, self.node, row):
            return Transition(EpochState.CONFIRMED)
        log.error("epoch %d refused by the chain: %s", row.epoch_id, exc.facts)
        return Transition(EpochState.FAILED, error=f"{exc}: {exc.facts}")

    def _swept(self, row: SettlementEpoch) -> SettlementEpoch | Outcome:
        """`before_send` done (x402 channels claimed into the router's escrow); a lane it refuses becomes a
        loss and the epoch is rebuilt without it."""
        for _ in range(len((row.batch or {}).get("vouchers", [])) + 1):
            refused = self.before_send(row) if self.before_send is not None else None
            if refused is None:
                return row
            if isinstance(refused, NotYet):  # its transactions are not mined yet: sent at a later tick
                return EpochState.BUILT
            if (rebuilt := self.builder.without_lane(row.epoch_id, refused)) is None:
                return None
            row = rebuilt
        raise AssertionError("a batch cannot be refused more times than it has lanes")

    def _preflight(self, row: SettlementEpoch) -> SettlementEpoch | Outcome:
        """Simulate the settle; each lane that would revert becomes a loss and the epoch is rebuilt
        without it. The row that passes, or what it ended in (FAILED, or None when dissolved)."""
        for _ in range(len((row.batch or {}).get("vouchers", [])) + 1):
            refusal = preflight(self.settlement, self.node, row)
            if refusal is None:
                return row
            assert row.batch is not None
            vouchers = [SignedVoucher.from_json(v) for v in row.batch["vouchers"]]
            lane = refused_lane(refusal, vouchers, [int(a) for a in row.batch["amounts"]])
            if lane is None:
                return self.refused(row, refusal)
            if (rebuilt := self.builder.without_lane(row.epoch_id, lane)) is None:
                return None
            row = rebuilt
        raise AssertionError("a batch cannot be refused more times than it has lanes")
