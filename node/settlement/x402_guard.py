"""Every settlement tick: claim at once each x402 channel whose payer asked to withdraw, before the
withdrawal can finish (docs/x402.md, "A payer who withdraws right after being served").

`finalizeWithdraw` pays the payer `min(pending, balance - totalClaimed)` once `withdrawDelay` has passed,
so whatever the node charged and has not claimed by then is gone. The indexer mirrors the channel's
`WithdrawInitiated` (`channel_accounts.pending_withdrawal`); this guard claims every such channel up to
what the node charged on it (its router lane's `charged_total`, within the highest voucher its payer
signed) and sweeps the claim into the router's escrow account, where the channel's next epoch collects
it as usual (`X402Sweep` then finds it claimed). The delay is at least 900 s and the worker ticks every
few seconds, so one missed tick costs nothing.

One `router.collect` covers every channel; if the chain refuses it, the channels are claimed one by one
and each that still cannot be (its withdrawal already finished, a voucher that does not recover) is
recorded and skipped: no payer's channel can stop the others being claimed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from sqlalchemy import and_, select
from sqlalchemy.orm import Session, sessionmaker

from node.chain.x402_channels import ClaimRow, X402Chain
from node.db.models import ChannelAccount, Lane, X402Channel
from node.errors import ChainError
from node.payment.x402.typed import ChannelConfig
from node.protocol.hexstr import from_hex

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GuardReport:
    claimed: tuple[int, ...] = ()  # router lanes claimed this tick
    refused: dict[int, str] = field(default_factory=dict)  # lane -> why the chain refused its claim


class X402Guard:
    def __init__(self, factory: sessionmaker[Session], chain: X402Chain, node: str) -> None:
        assert chain.router is not None, "the guard needs the node's router"
        self.factory, self.chain = factory, chain
        self.router, self.node = chain.router.address.lower(), node.lower()

    def __call__(self) -> GuardReport:
        claims = self.due()
        if not claims:
            return GuardReport()
        try:
            self.chain.collect([c for _, c in claims])
            log.info("claimed %d x402 channels with a pending withdrawal", len(claims))
            return GuardReport(tuple(lane for lane, _ in claims))
        except ChainError as exc:
            log.warning("claim of %d withdrawing channels refused (%s): one by one", len(claims), exc.message)
        claimed, refused = [], {}
        for lane, claim in claims:
            try:
                self.chain.collect([claim])
                claimed.append(lane)
            except ChainError as exc:
                log.error("x402 channel of lane %d cannot be claimed: %s", lane, exc.message)
                refused[lane] = exc.message
        return GuardReport(tuple(claimed), refused)

    def due(self) -> list[tuple[int, ClaimRow]]:
        """(lane, claim) of each channel with a pending withdrawal that the node charged beyond its claim."""
        lanes = and_(Lane.payer == self.router, Lane.node == self.node, Lane.lane == X402Channel.lane)
        q = (select(X402Channel, Lane.charged_total)
             .join(ChannelAccount, ChannelAccount.channel_id == X402Channel.channel_id)
             .join(Lane, lanes)
             .where(X402Channel.node == self.node, ChannelAccount.pending_withdrawal > 0,
                    Lane.charged_total > ChannelAccount.total_claimed)
             .order_by(X402Channel.lane))
        with self.factory() as session:
            rows = session.execute(q).all()
        return [(ch.lane, claim_row(ch, int(charged))) for ch, charged in rows]


def claim_row(ch: X402Channel, total_claimed: int) -> ClaimRow:
    """The claim of channel `ch` up to `total_claimed`, with the highest voucher its payer signed (none
    recorded: an empty signature, which the chain refuses, so the channel is recorded as refused)."""
    c = ch.config
    config = ChannelConfig(c["payer"], c["payerAuthorizer"], c["receiver"], c["receiverAuthorizer"], c["token"],
                           int(c["withdrawDelay"]), from_hex(c["salt"]))
    signature = from_hex(ch.signature) if ch.signature else b""
    return ClaimRow(config, ch.signed_max, signature, total_claimed)
