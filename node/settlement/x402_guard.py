"""Every settlement tick: claim at once each x402 channel whose payer asked to withdraw, before the
withdrawal can finish (docs/x402.md, "A payer who withdraws right after being served").

`finalizeWithdraw` pays the payer `min(pending, balance - totalClaimed)` once `withdrawDelay` has passed,
so whatever the node charged and has not claimed by then is gone. The indexer mirrors the channel's
`WithdrawInitiated` (`channel_accounts.pending_withdrawal`); this guard claims each such channel whose
withdrawal could take part of what the node charged (a charge above `balance - pending`) up to that charge
(its router lane's `charged_total`, within the highest voucher its payer signed) and sweeps the claim
into the router's escrow account, where the channel's next epoch collects it as usual (`X402Sweep` then
finds it claimed). A withdrawal that leaves the charge waits for that epoch's batched claim; with
`token_per_eth`, a charge worth less than its claim's gas is not claimed (the node would pay more than
it collects: a dust charge and an `initiateWithdraw` made it send a 153,016-gas claim every time).
The delay is at least 900 s and the worker ticks every few seconds, so one missed tick costs nothing.

The mirror is trusted only while the indexer keeps up (its cursor checked within `max_mirror_lag_s`, no
more than `max_mirror_lag_blocks` behind the head it saw, not stalled or halted): otherwise the guard
reads each charged, unclaimed channel's pending withdrawal from the chain itself, so a stalled or
lagging indexer never lets a withdrawal run out unseen.

One `router.collect` covers every channel; if the chain refuses it, the channels are claimed one by one
and each that still cannot be (its withdrawal already finished, a voucher that does not recover) is
recorded and skipped: no payer's channel can stop the others being claimed.

Claims are transaction-manager intents of the operator key, like the settles (node/settlement/
x402_intents.py): a tick first polls the open ones (a stuck claim is bumped) and sends nothing new while
one is pending.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session, sessionmaker

from node.chain.tx_manager import TxManager
from node.chain.x402_channels import ClaimRow, X402Chain
from node.db import queries
from node.db.models import Lane
from node.db.payment_models import ChannelAccount, X402Channel
from node.errors import ChainError
from node.payment.x402.typed import ChannelConfig
from node.protocol.hexstr import from_hex
from node.settlement.x402_intents import X402Intents

log = logging.getLogger(__name__)
CLAIM_GAS = 155_000  # a guard's router.collect of one channel (claim, sweep, escrow deposit): 153,016 measured
ETH = 10**18  # wei


@dataclass(frozen=True)
class GuardReport:
    claimed: tuple[int, ...] = ()  # router lanes claimed this tick
    refused: dict[int, str] = field(default_factory=dict)  # lane -> why the chain refused its claim


class X402Guard:
    def __init__(self, factory: sessionmaker[Session], chain: X402Chain, tx: TxManager,
                 max_mirror_lag_s: float = 120.0, max_mirror_lag_blocks: int = 32,
                 token_per_eth: int | None = None) -> None:
        assert chain.router is not None, "the guard needs the node's router"
        self.factory, self.chain, self.intents = factory, chain, X402Intents(chain, tx)
        self.router, self.node = chain.router.address.lower(), tx.sender.lower()
        self.max_mirror_lag_s, self.max_mirror_lag_blocks = max_mirror_lag_s, max_mirror_lag_blocks
        self.token_per_eth = token_per_eth  # token units one ETH is worth; None: every claim is worth its gas

    def __call__(self) -> GuardReport:
        if self.intents.in_flight():  # polled (bumped, re-broadcast): nothing new until it lands
            return GuardReport()
        claims = self.due()
        if not claims:
            return GuardReport()
        try:
            self.intents.collect([c for _, c in claims])
            log.info("claimed %d x402 channels with a pending withdrawal", len(claims))
            return GuardReport(tuple(lane for lane, _ in claims))
        except ChainError as exc:
            log.warning("claim of %d withdrawing channels refused (%s): one by one", len(claims), exc.message)
        claimed, refused = [], {}
        for lane, claim in claims:
            try:
                self.intents.collect([claim])
                claimed.append(lane)
            except ChainError as exc:
                log.error("x402 channel of lane %d cannot be claimed: %s", lane, exc.message)
                refused[lane] = exc.message
        return GuardReport(tuple(claimed), refused)

    def due(self) -> list[tuple[int, ClaimRow]]:
        """(lane, claim) of each channel whose pending withdrawal could take some of what the node charged
        beyond its claim, where that charge pays for its claim's gas (`token_per_eth`)."""
        lanes = and_(Lane.payer == self.router, Lane.node == self.node, Lane.lane == X402Channel.lane)
        claimed = func.coalesce(ChannelAccount.total_claimed, 0)
        # a pending withdrawal as of the last final block counts too (a reorg can bring it back)
        q = (select(X402Channel, Lane.charged_total, ChannelAccount.balance, ChannelAccount.total_claimed,
                    ChannelAccount.pending_withdrawal, ChannelAccount.final_pending_withdrawal)
             .join(Lane, lanes)
             .outerjoin(ChannelAccount, ChannelAccount.channel_id == X402Channel.channel_id)
             .where(X402Channel.node == self.node, Lane.charged_total > claimed)
             .order_by(X402Channel.lane))
        with self.factory() as session:
            fresh = self._mirror_is_fresh(session)
            rows = session.execute(q).all()
        floor = self._claim_floor()
        if fresh:
            return [(ch.lane, claim_row(ch, int(charged))) for ch, charged, balance, done, pending, final in rows
                    if _worth_claiming(int(charged), int(balance or 0), int(done or 0),
                                       max(int(pending or 0), int(final or 0)), floor)]
        log.warning("the channel mirror is stale: reading %d charged channels' withdrawals from the chain", len(rows))
        due = []
        for ch, charged, *_ in rows:
            state = self.chain.channel(from_hex(ch.channel_id))
            if _worth_claiming(int(charged), state.balance, state.total_claimed, state.pending_withdrawal, floor):
                due.append((ch.lane, claim_row(ch, int(charged))))
        return due

    def _claim_floor(self) -> int:
        """What one channel's claim costs in gas now, in token units (0 unless `token_per_eth`)."""
        if self.token_per_eth is None:
            return 0
        per_gas = int(self.chain.client.w3.eth.gas_price) * self.token_per_eth
        return -(-CLAIM_GAS * per_gas // ETH)

    def _mirror_is_fresh(self, session: Session) -> bool:
        """The paid path's own rule (MirrorHead.problem): reached the chain lately AND not far behind it;
        an indexer that is alive but catching up has not seen the latest withdrawals."""
        head = queries.mirror_head(session)
        if head is None or head.checked_at is None:
            return False
        problem = head.problem(datetime.now(UTC), self.max_mirror_lag_s, self.max_mirror_lag_blocks)
        if problem is not None:
            log.warning("x402 guard: not trusting the channel mirror: %s", problem)
        return problem is None


def _worth_claiming(charged: int, balance: int, claimed: int, pending: int, floor: int) -> bool:
    """A pending withdrawal could take part of the charge (it leaves less than the charge in the channel:
    `finalizeWithdraw` pays `min(pending, balance - claimed)`), and what the claim collects pays for its
    gas. A withdrawal that leaves the charge waits for the epoch's claim (one of many in its collect); a
    charge below the floor is left: claiming it costs the node more gas than it collects."""
    return pending > 0 and charged > max(claimed, balance - pending) and charged - claimed >= floor


def claim_row(ch: X402Channel, total_claimed: int) -> ClaimRow:
    """The claim of channel `ch` up to `total_claimed`, with the highest voucher its payer signed (none
    recorded: an empty signature, which the chain refuses, so the channel is recorded as refused)."""
    c = ch.config
    config = ChannelConfig(c["payer"], c["payerAuthorizer"], c["receiver"], c["receiverAuthorizer"], c["token"],
                           int(c["withdrawDelay"]), from_hex(c["salt"]))
    signature = from_hex(ch.signature) if ch.signature else b""
    return ClaimRow(config, ch.signed_max, signature, total_claimed)
