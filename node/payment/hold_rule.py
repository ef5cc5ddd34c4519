"""When a new voucher may hold its lane: the rule, written once in Python (`refusal`) and mirrored in
the one statement that places a hold on PostgreSQL (migration 0015's `loranode_try_hold`, which
lane_pg.py calls), so that the hold is decided and written in one round trip while the (payer, node)
lock is held only by the server.

A hold is placed only if every check passes (the voucher never used, fresh enough, the lane free of
another live hold, the voucher's order, the escrow); the caller then checks the same view with
`refusal` and raises what it names. Both must agree: the tests run every refusal on both backends.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from node.errors import DepositNotFinal, InsufficientEscrow, NodeError, VoucherConflict
from node.payment.lane import HoldView, LaneRow


@dataclass(frozen=True)
class HoldRequest:
    """A new voucher asking to hold `max_fee` on its lane, by API process `owner` at `now`."""

    payer: str  # lowercase
    node: str  # lowercase
    lane: int
    voucher_hash: str
    cumulative: int
    max_fee: int
    now: datetime
    live_since: datetime  # a hold placed after this is live (now - the reservation TTL)
    owner: str
    is_fresh: bool = True  # the voucher has the time left a new one needs (checked by the caller)


def refusal(view: HoldView, request: HoldRequest) -> NodeError | None:
    """Why this (unused, fresh) voucher may not hold its lane, or None: the lane's order, then the escrow."""
    return order_refusal(view.lane, request) or funds_refusal(view, request.max_fee)


def order_refusal(lane: LaneRow, r: HoldRequest) -> NodeError | None:
    # A live hold on this lane blocks every other voucher until it ends or expires. The same voucher
    # sent again is in flight on the process that holds it (409: one voucher, one generation), unless
    # that process is this one's earlier life (PaymentService refuses it while it lives here): then
    # its first request died with that process, and the retry takes the hold over.
    held = lane.reserved_voucher_hash
    if held and lane.reserved_at and lane.reserved_at > r.live_since:
        if held != r.voucher_hash:
            return VoucherConflict("a request is already in flight on this lane: use another lane",
                                   lane=r.lane, in_flight=held)
        if lane.reserved_by != r.owner:
            return VoucherConflict("this voucher's request is in flight on another API process: wait for its "
                                   "answer", lane=r.lane, in_flight_on=lane.reserved_by)
    if r.cumulative < lane.last_cumulative:
        return VoucherConflict("stale voucher: cumulative is below one already accepted on this lane",
                               lane=r.lane, cumulative=str(r.cumulative), last_cumulative=str(lane.last_cumulative))
    needed = lane.charged_total + r.max_fee
    if r.cumulative < needed:
        return InsufficientEscrow("the voucher does not cover this request: sign chargedTotal + maxFee",
                                  lane=r.lane, cumulative=str(r.cumulative), charged_total=str(lane.charged_total),
                                  max_fee=str(r.max_fee), needed=str(needed))
    return None


def funds_refusal(view: HoldView, max_fee: int) -> NodeError | None:
    """Only final deposits are spent, and a thaw is cancelled (or lowered) only as of the last final
    block: a reorg can remove a deposit the node served against, or a cancel and bring back a thaw that
    ended long ago. A thaw started since counts at once. What the node charged and has not collected
    counts, settlement losses included until they are recovered or written off (node/db/loss.py): the
    lane's next voucher still collects them."""
    final = view.balance - view.pending_deposits
    thawing = max(view.thawing, view.final_thawing)
    spendable = max(final - thawing - view.uncollected, 0) - view.other_holds
    if spendable >= max_fee:
        return None
    if spendable + view.pending_deposits >= max_fee:
        return DepositNotFinal(
            f"the deposit is not final yet: {view.pending_deposits} of this escrow counts once the chain "
            f"reaches block {view.pending_until_block}", spendable=spendable, max_fee=max_fee,
            pending_deposits=str(view.pending_deposits), final_at_block=view.pending_until_block)
    if thawing > view.thawing:
        return InsufficientEscrow(
            "not enough escrow for this request: a thaw was cancelled or lowered in a block that is not final "
            "yet, and the escrow it frees counts once that block is final", spendable=spendable,
            max_fee=max_fee, balance=view.balance, thawing=view.thawing, thawing_until_final=thawing)
    return InsufficientEscrow("not enough escrow for this request", spendable=spendable, max_fee=max_fee,
                              balance=view.balance, thawing=view.thawing)
