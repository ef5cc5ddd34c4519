"""An x402 payment sent again: the answer its voucher bought, free, to the same request (docs/x402.md,
"A payment sent again").

A stock client whose answer was lost never read its PAYMENT-RESPONSE, so its channel state did not move:
it signs the same voucher for the same request again. An x402 voucher names no request body (a lane
voucher's `requestHash` does), so the node keeps the body's hash with the stored answer (`REQUEST_KEY`,
never sent to anyone) and replays only to that body; another body gets the corrective 402, as before.

A voucher stays the payer's secret until the channel is claimed: a claim publishes the payer's highest
voucher, and the corrective 402 shows whoever holds one of the channel's vouchers the latest. From the
first sign of a claim on, the stored answer goes only to the payer's X-Receipt-Read of its receipt.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from node.db.models import Lane, Receipt
from node.db.models import Voucher as VoucherRow
from node.payment.x402.channel_check import ChannelView
from node.protocol.hexstr import to_hex

REQUEST_KEY = "x402RequestHash"  # in the stored answer of an x402 voucher: keccak256 of the body it answered


def kept(answer: dict[str, Any], request: bytes) -> dict[str, Any]:
    """The answer as stored: with the hash of the request body it answered."""
    return {**answer, REQUEST_KEY: to_hex(request)}


def as_sent(stored: dict[str, Any]) -> dict[str, Any]:
    """The stored answer as the client gets it."""
    return {k: v for k, v in stored.items() if k != REQUEST_KEY}


def answers(stored: dict[str, Any] | None, request: bytes) -> bool:
    """Whether `stored` is the answer to the request body hashing to `request`."""
    return stored is not None and stored.get(REQUEST_KEY) == to_hex(request)


def may_be_public(session: Session, view: ChannelView, router: str, node: str, lane: int,
                  held_since: datetime) -> bool:
    """Whether the channel's vouchers may be public: the chain shows a claim, a refund (its claim) or a
    withdrawal (the node's guard claims it); the channel is held (a refund sent and not mirrored yet holds
    it, its claim published; or another request of the payer runs); or one of the channel's receipts is in
    an epoch (its sweep claims the channel with the highest voucher, maybe sent already). A hold placed
    after `held_since` is live."""
    if view.total_claimed or view.refund_nonce or view.pending_withdrawal:
        return True
    held = session.get(Lane, (router, node, lane))
    if held is not None and held.reserved_voucher_hash and held.reserved_at and held.reserved_at > held_since:
        return True
    in_epoch = (select(Receipt.id).join(VoucherRow, VoucherRow.voucher_hash == Receipt.voucher_hash)
                .where(VoucherRow.payer == router, VoucherRow.node == node, VoucherRow.lane == lane,
                       Receipt.epoch_id.is_not(None)).limit(1))
    return session.scalar(in_epoch) is not None


def receipt_of(session: Session, voucher_hash: str) -> str:
    receipt = session.scalar(select(Receipt.receipt_hash).where(Receipt.voucher_hash == voucher_hash))
    assert receipt is not None, "a stored answer is committed with its receipt"
    return receipt
