"""A channel's contract state as the indexer mirrored it (`channel_accounts`, docs/x402.md): what the hold
reads, one indexed primary-key read, no RPC call.

A withdrawal counts as lowered only as of the last final block (a reorg can drop the lowering and
bring back one that is ready): the larger of the mirror's pending withdrawal and the final block's.
The mirror lags the chain by the indexer's confirmations and poll. Either way that lag is safe: a
withdrawal the mirror has not seen yet can only take what stays unclaimed when its delay ends, and the
settlement worker claims every charged channel with a pending withdrawal long before that
(`node/settlement/x402_guard.py`); a deposit it has not seen yet makes the hold read the chain itself
(`X402Payments`), so a payer is never refused for being fast.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from node.db.payment_models import ChannelAccount
from node.protocol.hexstr import to_hex


@dataclass(frozen=True)
class MirroredChannel:
    """The fields `X402Payments` reads (node.payment.x402.service.OnChain)."""

    balance: int
    total_claimed: int
    pending_withdrawal: int
    withdraw_requested_at: int  # unix seconds; 0: none pending
    refund_nonce: int
    pending_deposits: int = 0  # in `balance`, not final yet (a reorg can remove them)


EMPTY = MirroredChannel(0, 0, 0, 0, 0)


class ChannelMirror:
    """`mirror(channel_id)` reads one channel; a channel the mirror has not seen is empty."""

    def __init__(self, factory: sessionmaker[Session], withdraw_delay_s: int) -> None:
        self.factory = factory
        self.withdraw_delay_s = withdraw_delay_s  # the node's channels all have it (checked by check_terms)

    def __call__(self, channel_id: bytes) -> MirroredChannel:
        with self.factory() as session:
            row = session.execute(select(
                ChannelAccount.balance, ChannelAccount.total_claimed, ChannelAccount.pending_withdrawal,
                ChannelAccount.withdraw_ready_at, ChannelAccount.refund_nonce, ChannelAccount.final_pending_withdrawal,
                ChannelAccount.final_withdraw_ready_at, ChannelAccount.pending_deposits,
            ).where(ChannelAccount.channel_id == to_hex(channel_id))).first()
        if row is None:
            return EMPTY
        balance, claimed, pending, ready_at, nonce, final_pending, final_ready_at, not_final = row
        if final_pending > pending:
            pending, ready_at = final_pending, final_ready_at
        requested = int(ready_at.timestamp()) - self.withdraw_delay_s if ready_at is not None else 0
        return MirroredChannel(int(balance), int(claimed), int(pending), requested, int(nonce), int(not_final))

    def has_refund(self, channel_id: bytes, nonce: int) -> bool:
        """Whether the mirror has seen the channel's refund number `nonce` (its `refundNonce` reached it)."""
        return self(channel_id).refund_nonce >= nonce
