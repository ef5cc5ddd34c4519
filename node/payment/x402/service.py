"""Paying one request with x402 `batch-settlement` (docs/x402.md, "Ledger mapping").

A channel is a lane of the node's router: the node turns each accepted x402 voucher into a lane
voucher it signs itself, `Voucher{payer: router, node, lane: the channel's, cumulative: the x402
ceiling, requestHash: the x402 voucher's digest, deadline: never}`. From the hold on, the lane path
does the rest unchanged (PaymentService.finish / cancel / write_off, the same receipts, epochs and
split), and Settlement collects the lane from the router's escrow account once the router has claimed
and swept the channel (the router's ERC-1271 signature is the node's).

    check(header)              -> X402Checked: the stateless checks (terms, channel id, signature)
    hold(checked, max_fee, p)  -> a lane Hold, after the checks against the channel's books and deposit
    payment_response(hold, t)  -> the PAYMENT-RESPONSE object of the charged answer
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Protocol

from node.errors import BadRequest
from node.payment.lane import HoldView
from node.payment.ledger import Reservation
from node.payment.pricing import Pricing
from node.payment.service import Hold, PaymentService
from node.payment.voucher_check import CheckedVoucher
from node.payment.x402.book import ChannelBook
from node.payment.x402.channel_check import (
    PREFIX,
    ChannelView,
    X402Refused,
    check_amounts,
    check_deposit_signature,
    check_min_deposit,
    check_signature,
    check_terms,
)
from node.payment.x402.facilitator import Facilitator
from node.payment.x402.terms import CUMULATIVE_MISMATCH, X402Terms
from node.payment.x402.wire import Payment, decode_payment, payment_response
from node.protocol.eip712 import sign_digest
from node.protocol.hexstr import to_hex
from node.protocol.voucher import Voucher, voucher_digest

NEVER = 2**63 - 1  # the router lane voucher's deadline (the node's own, valid until collected; fits BIGINT)


class OnChain(Protocol):
    """The channel's contract state (node.chain.x402_channels.OnChainChannel)."""

    @property
    def balance(self) -> int: ...
    @property
    def total_claimed(self) -> int: ...
    @property
    def pending_withdrawal(self) -> int: ...
    @property
    def withdraw_requested_at(self) -> int: ...
    @property
    def refund_nonce(self) -> int: ...


ReadChannel = Callable[[bytes], OnChain]
SubmitDeposit = Callable[[Payment], object]


@dataclass(frozen=True)
class X402Checked:
    payment: Payment
    channel_id: bytes
    digest: bytes  # the x402 voucher's EIP-712 digest


@dataclass(frozen=True)
class X402Voucher(CheckedVoucher):
    """The router lane voucher the node signed for an accepted x402 voucher, with the channel's state."""

    x402: X402Checked
    view: ChannelView
    deposit_tx: str = ""  # the deposit this payment carried, submitted by the node ("" for a voucher)


class X402Payments:
    def __init__(self, payments: PaymentService, book: ChannelBook, terms: X402Terms, node_key: str,
                 read_channel: ReadChannel, submit_deposit: SubmitDeposit, channel_ttl_s: float = 2.0) -> None:
        self.payments, self.book, self.terms = payments, book, terms
        self.node_key = node_key
        self.read_channel, self.submit_deposit = read_channel, submit_deposit
        # A channel's chain state is read at most every `channel_ttl_s` (the spec's "fresh mirror"): a
        # withdrawal seen that much later still finishes only after the delay, which the node's settle
        # latency is checked to beat (node/api/wiring.py); a deposit is always read again.
        self.channel_ttl_s = channel_ttl_s
        self._chain_cache: dict[bytes, tuple[float, OnChain]] = {}
        self.ledger = payments.ledger
        self.router = terms.router.lower()
        self.facilitator: Facilitator | None = None  # /x402/verify, /settle, /supported (set by the wiring)

    def check(self, header: str) -> X402Checked:
        payment = decode_payment(header)
        if payment.kind == "refund":
            raise BadRequest("cooperative refunds are not served yet: a payer leaves by initiateWithdraw "
                             "(docs/x402.md)", type="refund")
        channel = check_terms(payment, self.terms)
        return X402Checked(payment, channel, check_signature(payment, self.terms, channel))

    def hold(self, checked: X402Checked, max_fee: int, pricing: Pricing | None = None) -> Hold:
        """Hold `max_fee` on the channel's lane: refused (402, the spec's codes) unless the voucher pays
        this request on top of what the channel was charged and its deposit covers it. A deposit is
        submitted on chain first (the node pays the gas)."""
        payment = checked.payment
        lane_id = self.book.lane_of(checked.channel_id, payment.config)
        lane_voucher = Voucher(self.terms.router, self.payments.node, lane_id, payment.voucher.max_claimable,
                               checked.digest, NEVER)
        digest = voucher_digest(lane_voucher, self.payments.domain)
        now = datetime.fromtimestamp(self.ledger.clock(), UTC)
        # one channel's lock and lane: channels are separate accounts, so the router's other lanes (one
        # per payer channel) are neither read nor waited for
        with self.ledger.lanes.transaction(lock_payer=self.router, node=self.ledger.node, lock_lane=lane_id) as tx:
            seen = tx.lane_view(self.router, self.ledger.node, lane_id, to_hex(digest))
            view, deposit_tx = self._accept(checked, seen, max_fee, now)
            tx.put_hold(self.router, self.ledger.node, lane_id, max_fee, to_hex(digest), now, self.ledger.instance)
            self.book.record_voucher(checked.channel_id, payment.voucher.max_claimable, payment.voucher.signature, tx)
        signature = sign_digest(self.node_key, digest)  # the digest above: hashed once
        v = lane_voucher
        signed = X402Voucher(v.payer, v.node, v.lane, v.cumulative, v.request_hash, v.deadline, signature, digest,
                             checked, view, deposit_tx)
        reservation = Reservation(self.router, self.ledger.node, lane_id, signed.digest_hex,
                                  lane_voucher.cumulative, max_fee, seen.lane.charged_total)
        return Hold(signed, reservation, pricing or self.payments.pricing)

    def _accept(self, checked: X402Checked, seen: HoldView, max_fee: int, now: datetime) -> tuple[ChannelView, str]:
        """The channel's state once the voucher may hold it (a deposit submitted and seen on chain), and
        the deposit's transaction ("" when none was sent: a voucher, or a deposit sent before)."""
        lane, payment = seen.lane, checked.payment
        view = self._view(checked, lane.charged_total)
        if seen.is_used:  # served already: its charge moved the total on (never a second generation)
            raise self._corrective(checked, view, "this voucher was already used")
        if lane.reserved_voucher_hash and lane.reserved_at and now - lane.reserved_at < self.ledger.ttl:
            raise X402Refused("another request holds this channel: retry shortly", PREFIX + "channel_busy")
        try:
            check_amounts(payment, view, max_fee, checked.channel_id)  # terms and signature: in `check`
        except X402Refused as exc:
            if exc.reason != CUMULATIVE_MISMATCH:
                raise
            raise self._corrective(checked, view, exc.message) from exc
        if payment.deposit is None:
            return view, ""
        check_min_deposit(payment, self.terms)
        check_deposit_signature(payment, self.terms)
        sent = self.submit_deposit(payment)
        self._chain_cache.pop(checked.channel_id, None)
        view = self._view(checked, lane.charged_total)
        check_amounts(replace(payment, deposit=None), view, max_fee, checked.channel_id)
        return view, _tx_hash(sent)

    def _corrective(self, checked: X402Checked, view: ChannelView, message: str) -> X402Refused:
        """The corrective 402: the channel's state with the last voucher its payer signed (read only here)."""
        entry = self.book.entry(checked.channel_id, checked.payment.config)
        latest = replace(view, signed_max=entry.signed_max, signature=entry.signature)
        return X402Refused(message, CUMULATIVE_MISMATCH, channel_state=latest.channel_state(checked.channel_id),
                           voucher_state=latest.voucher_state())

    def _view(self, checked: X402Checked, charged: int) -> ChannelView:
        chain = self._chain(checked.channel_id)
        return ChannelView(charged, 0, None, chain.balance, chain.total_claimed, chain.pending_withdrawal,
                           chain.withdraw_requested_at, chain.refund_nonce)

    def _chain(self, channel: bytes) -> OnChain:
        now = time.monotonic()
        cached = self._chain_cache.get(channel)
        if cached is not None and now - cached[0] < self.channel_ttl_s:
            return cached[1]
        state = self.read_channel(channel)
        self._chain_cache[channel] = (now, state)
        return state

    def payment_response(self, hold: Hold, charged_total: int) -> dict[str, Any]:
        """`PAYMENT-RESPONSE` after the charge: this request's charge and the channel's new state."""
        voucher = hold.checked
        assert isinstance(voucher, X402Voucher), "not an x402 hold"
        fee = charged_total - hold.reservation.charged_before
        state = replace(voucher.view, charged=charged_total).channel_state(voucher.x402.channel_id)
        deposit = voucher.x402.payment.deposit
        moved = str(deposit.amount) if deposit is not None and voucher.deposit_tx else ""
        return payment_response(self.terms.network, voucher.x402.payment.config.payer, fee, state,
                                transaction=voucher.deposit_tx, amount=moved)


def _tx_hash(receipt: Any) -> str:
    """A submitted transaction's hash as 0x-hex ("" for none)."""
    if not receipt:
        return ""
    value = receipt["transactionHash"]
    return value if isinstance(value, str) else "0x" + bytes(value).hex()
