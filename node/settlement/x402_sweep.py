"""Before an epoch's settle: the x402 channels behind the router's lanes in its batch are claimed and
swept into the router's escrow account, so `settle` collects them like any lane (docs/x402.md, "One
epoch with x402 receipts").

A router lane `k` collects `amount` this epoch; the channel of lane `k` must then have been claimed up to
`collected[router][node][k] + amount` (cumulative, so a re-sent sweep claims nothing twice), with the
highest voucher its payer signed. One `router.collect` covers every channel; if the chain refuses it, the
channels are tried one by one and the first that cannot be claimed (its payer withdrew, or a voucher
does not cover it) is returned as a refused lane: the service records it as a loss and rebuilds the
epoch without it, so no channel stops the others being paid.

The claims and the sweep are transaction-manager intents of the operator key (node/settlement/
x402_intents.py): until they are mined (or while any x402 intent is pending) the answer is `NOT_YET`
and the epoch stays BUILT until a later tick, so its preflight always sees the escrow account swept.
"""

from __future__ import annotations

import logging

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from node.chain.tx_manager import TxManager, TxRecord
from node.chain.x402_channels import ClaimRow, X402Chain
from node.db.loss import LossReason
from node.db.models import SettlementEpoch
from node.db.payment_models import X402Channel
from node.errors import ChainError
from node.protocol.hexstr import from_hex
from node.protocol.voucher import SignedVoucher
from node.settlement.refusal import NOT_YET, LaneRefusal, NotYet
from node.settlement.x402_guard import claim_row
from node.settlement.x402_intents import DONE, X402Intents

log = logging.getLogger(__name__)


class X402Sweep:
    def __init__(self, factory: sessionmaker[Session], chain: X402Chain, settlement: str, tx: TxManager) -> None:
        assert chain.router is not None, "the sweep needs the node's router"
        self.factory, self.chain, self.node = factory, chain, tx.sender
        self.intents = X402Intents(chain, tx)
        self.router = chain.router.address
        self.settlement = chain.client.contract("Settlement", settlement)

    def __call__(self, row: SettlementEpoch) -> LaneRefusal | NotYet | None:
        batch = row.batch or {}
        vouchers = [SignedVoucher.from_json(v) for v in batch.get("vouchers", [])]
        lanes = {v.lane: int(a) for v, a in zip(vouchers, batch.get("amounts", []), strict=True)
                 if v.payer.lower() == self.router.lower()}
        if not lanes:
            return None
        if self.intents.in_flight():  # a claim or sweep of an earlier tick (or the guard's) is not mined yet
            return NOT_YET
        claims = self._claims(lanes)
        if not claims:  # claimed already (the guard, a refund): what the channel contract owes still moves
            return _landed(self.intents.sweep())
        try:
            return _landed(self.intents.collect([c for _, c in claims]))
        except ChainError as exc:
            log.warning("x402 sweep of %d channels refused (%s): trying them one by one", len(claims), exc.message)
        sent = []
        for lane, claim in claims:
            try:
                sent.append(self.intents.collect([claim]))
            except ChainError as exc:
                return LaneRefusal(self.router.lower(), lane, LossReason.ESCROW_SHORT, f"x402 claim: {exc.message}")
        return NOT_YET if any(r.state not in DONE for r in sent) else None

    def _claims(self, lanes: dict[int, int]) -> list[tuple[int, ClaimRow]]:
        """(lane, claim) for every channel not yet claimed up to what this epoch collects from it."""
        out = []
        with self.factory() as session:
            rows = session.scalars(select(X402Channel).where(X402Channel.lane.in_(list(lanes)))).all()
        for ch in rows:
            collected = self.chain.client.call(self.settlement.functions.collected(self.router, self.node, ch.lane))
            target = collected + lanes[ch.lane]
            if self.chain.channel(from_hex(ch.channel_id)).total_claimed >= target:
                continue
            out.append((ch.lane, claim_row(ch, target)))  # no voucher recorded: the claim reverts, a loss
        return out


def _landed(record: TxRecord | None) -> NotYet | None:
    """None once `record` is mined (or there was nothing to send), else NOT_YET."""
    return None if record is None or record.state in DONE else NOT_YET
