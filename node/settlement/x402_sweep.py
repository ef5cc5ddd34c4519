"""Before an epoch's settle: the x402 channels behind the router's lanes in its batch are claimed and
swept into the router's escrow account, so `settle` collects them like any lane (docs/x402.md, "One
epoch with x402 receipts").

A router lane `k` collects `amount` this epoch; the channel of lane `k` must then have been claimed up to
`collected[router][node][k] + amount` (cumulative, so a re-sent sweep claims nothing twice), with the
highest voucher its payer signed. One `router.collect` covers every channel; if the chain refuses it, the
channels are tried one by one and the first that cannot be claimed (its payer withdrew, or a voucher
does not cover it) is returned as a refused lane: the service records it as a loss and rebuilds the
epoch without it, so no channel stops the others being paid.
"""

from __future__ import annotations

import logging

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from node.chain.x402_channels import ClaimRow, X402Chain
from node.db.loss import LossReason
from node.db.models import SettlementEpoch, X402Channel
from node.errors import ChainError
from node.protocol.hexstr import from_hex
from node.protocol.voucher import SignedVoucher
from node.settlement.refusal import LaneRefusal
from node.settlement.x402_guard import claim_row

log = logging.getLogger(__name__)


class X402Sweep:
    def __init__(self, factory: sessionmaker[Session], chain: X402Chain, settlement: str, node: str) -> None:
        assert chain.router is not None, "the sweep needs the node's router"
        self.factory, self.chain, self.node = factory, chain, node
        self.router = chain.router.address
        self.settlement = chain.client.contract("Settlement", settlement)

    def __call__(self, row: SettlementEpoch) -> LaneRefusal | None:
        batch = row.batch or {}
        vouchers = [SignedVoucher.from_json(v) for v in batch.get("vouchers", [])]
        lanes = {v.lane: int(a) for v, a in zip(vouchers, batch.get("amounts", []), strict=True)
                 if v.payer.lower() == self.router.lower()}
        claims = self._claims(lanes)
        if not claims:  # claimed already (the guard, a refund): what the channel contract owes still moves
            if lanes:
                self.chain.sweep()
            return None
        try:
            self.chain.collect([c for _, c in claims])
            return None
        except ChainError as exc:
            log.warning("x402 sweep of %d channels refused (%s): trying them one by one", len(claims), exc.message)
        for lane, claim in claims:
            try:
                self.chain.collect([claim])
            except ChainError as exc:
                return LaneRefusal(self.router.lower(), lane, LossReason.ESCROW_SHORT, f"x402 claim: {exc.message}")
        return None

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

