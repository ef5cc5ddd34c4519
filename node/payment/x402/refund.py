"""The cooperative refund, the node as its own facilitator (docs/x402.md, "Cooperative refund").

The payer sends a `refund` payment: its channel config, a voucher whose ceiling is exactly what the node
charged (`maxClaimableAmount == chargedCumulativeAmount`: it buys nothing) and optionally an amount. The
node, as the channel's receiver authorizer, claims what it charged with that very voucher and returns the
rest (or the amount asked, if less) in one transaction (`multicall(claim, refund)`): a refund can never
take a charge. The node pays that transaction's gas, so a partial refund is at least the node's minimum
deposit (like a deposit it sends): 1-wei refunds, one after another, cannot drain its gas key; and with
`token_per_eth` a refund is granted only once the channel's fees cover the node's gas on it, its deposits
and this refund (node/payment/x402/gas_cover.py).
No request is served on the channel meanwhile: a hold of nothing is placed on its lane first, and dropped
only once the indexer's mirror shows the refund, so no hold reads a balance that the refund already returned.

The refund voucher is the same bytes at a given charged total and the amount is not signed, so a refund
sent again (or anyone's ask of 1 unit, once a claim published that voucher) would be another transaction
from the node's gas key. At a charged total that an earlier refund used (sent, mirrored or not), only
the whole rest of a partial refund is returned, once (`refund_amount_invalid`): a partial refund needs a
request charged first, and a payer's whole balance always comes back.

    X402Refunds.refund(header) -> the PAYMENT-RESPONSE object (success, transaction, amount, channelState)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from eth_hash.auto import keccak

from node.payment.x402.book import RefundMark
from node.payment.x402.chain_reads import OnChain
from node.payment.x402.channel_check import PREFIX, ChannelView, X402Refused, check_signature, check_terms
from node.payment.x402.gas_cover import REFUND_GAS, GasCover
from node.payment.x402.service import X402Checked, X402Payments
from node.payment.x402.typed import ChannelConfig
from node.payment.x402.wire import Payment, decode_payment, payment_response
from node.protocol.hexstr import to_hex

log = logging.getLogger(__name__)
NO_BALANCE = PREFIX + "refund_no_balance"
NOT_A_REFUND = PREFIX + "refund_payload"
BELOW_MIN_DEPOSIT = PREFIX + "refund_below_min_deposit"
REFUND_AMOUNT_INVALID = PREFIX + "refund_amount_invalid"


@dataclass(frozen=True)
class RefundOrder:
    """What the chain is asked: claim the channel up to `claim_to` (when above what it has claimed, with the
    payer's voucher) and return `amount` to the payer."""

    config: ChannelConfig
    voucher_ceiling: int
    voucher_signature: bytes
    claim_to: int | None
    amount: int


SubmitRefund = Callable[[RefundOrder], str]  # the transaction hash, once mined
IsMirrored = Callable[[bytes, int], bool]  # (channel, refund nonce): the mirror has seen it


class X402Refunds:
    def __init__(self, x402: X402Payments, read_live: Callable[[bytes], OnChain], submit: SubmitRefund,
                 is_mirrored: IsMirrored, mirror_wait_s: float = 30.0, poll_s: float = 0.2,
                 gas: GasCover | None = None) -> None:
        self.x402, self.read_live, self.submit, self.is_mirrored = x402, read_live, submit, is_mirrored
        self.mirror_wait_s, self.poll_s = mirror_wait_s, poll_s
        self.gas = gas  # None (no `token_per_eth`): refunds are granted whatever the node's gas on the channel

    def refund(self, header: str) -> dict[str, Any]:
        payment = decode_payment(header)
        if payment.kind != "refund":
            raise X402Refused("not a refund payment", NOT_A_REFUND, type=payment.kind)
        terms = self.x402.terms
        channel = check_terms(payment, terms)
        checked = X402Checked(payment, channel, check_signature(payment, terms, channel))
        lane, charged, hold_id = self._hold(checked)
        tx_hash, mirrored = None, False
        try:
            order, state, last = self._order(payment, channel, charged)
            tx_hash = self._send(channel, order, last)
            log.info("x402 refund of %d on lane %d: %s", order.amount, lane, tx_hash)
            # counted once its hash is known: a count that fails then keeps the hold until mirrored (its TTL)
            self.x402.book.add_gas(channel, order.config, REFUND_GAS)
            mirrored = self._wait_mirrored(channel, state.refund_nonce + 1)
        finally:
            if tx_hash is None or mirrored:  # else the hold runs out by itself (its TTL)
                self._drop(lane, hold_id)
        after = ChannelView(charged, 0, None, state.balance - order.amount, max(state.total_claimed, charged),
                            0, 0, state.refund_nonce + 1)
        return payment_response(terms.network, payment.config.payer, None, after.channel_state(channel),
                                transaction=tx_hash, amount=str(order.amount))

    def _hold(self, checked: X402Checked) -> tuple[int, int, str]:
        """A hold of nothing on the channel's lane (no request is served during the refund), once the
        voucher is exactly the charged total (else the corrective 402); (lane, charged total, the hold's id)."""
        x402, ledger = self.x402, self.x402.ledger
        payment, channel = checked.payment, checked.channel_id
        lane = x402.book.lane_of(channel, payment.config)
        hold_id = to_hex(keccak(b"x402 refund" + channel + payment.voucher.signature))
        now = datetime.fromtimestamp(ledger.clock(), UTC)
        with ledger.lanes.transaction(lock_payer=x402.router, node=ledger.node, lock_lane=lane) as tx:  # as a hold
            seen = tx.hold_view(x402.router, ledger.node, lane, hold_id, now - ledger.ttl)
            row = seen.lane
            if row.reserved_voucher_hash and row.reserved_at and now - row.reserved_at < ledger.ttl:
                raise X402Refused("another request holds this channel: retry shortly", PREFIX + "channel_busy")
            if payment.voucher.max_claimable != row.charged_total:
                raise x402.corrective(checked, row.charged_total,
                                      "a refund voucher's ceiling must be the channel's charged total")
            tx.put_hold(x402.router, ledger.node, lane, 0, hold_id, now, ledger.instance)
        return lane, row.charged_total, hold_id

    def _order(self, payment: Payment, channel: bytes, charged: int
               ) -> tuple[RefundOrder, OnChain, RefundMark | None]:
        """What to send, once the rule allows it: kept as the channel's latest refund before it is sent
        (and the latest one before it)."""
        state = self.read_live(channel)
        claim_to = max(state.total_claimed, charged)
        available = state.balance - claim_to
        amount = available if payment.refund_amount is None else min(payment.refund_amount, available)
        if amount <= 0:
            raise X402Refused("the channel has nothing left to refund", NO_BALANCE, balance=str(state.balance),
                              charged=str(charged))
        if amount < min(available, self.x402.terms.min_deposit):  # the node pays each refund's gas
            raise X402Refused("a partial refund is at least the node's minimum deposit (extra.minDeposit): ask "
                              "for that much, or for everything", BELOW_MIN_DEPOSIT, amount=str(amount),
                              min_deposit=str(self.x402.terms.min_deposit))
        last = self.x402.book.refund_mark(channel)
        if last is not None and last.total == charged and not (last.was_partial and amount == available):
            raise X402Refused("an earlier refund used this refund voucher (the channel's charged total): at it "
                              "only the whole rest of a partial refund is returned; a partial refund needs a "
                              "request charged first", REFUND_AMOUNT_INVALID, charged=str(charged),
                              available=str(available), amount=str(amount))
        if self.gas is not None:  # the channel's fees pay for the node's gas on it (x402/gas_cover.py)
            self.gas.check_refund(charged, self.x402.book.node_gas(channel), self.x402.terms.withdraw_delay_s)
        self.x402.book.record_refund(channel, RefundMark(charged, amount < available))
        v = payment.voucher
        order = RefundOrder(payment.config, v.max_claimable, v.signature,
                            charged if charged > state.total_claimed else None, amount)
        return order, state, last

    def _send(self, channel: bytes, order: RefundOrder, last: RefundMark | None) -> str:
        """The refund's transaction; one that failed (reverted, or never sent) leaves the latest refund as
        it was: the payer's refund sent again is not one that "used" its voucher."""
        try:
            return self.submit(order)
        except BaseException:
            self.x402.book.record_refund(channel, last)
            raise

    def _wait_mirrored(self, channel: bytes, nonce: int) -> bool:
        deadline = time.monotonic() + self.mirror_wait_s
        while not self.is_mirrored(channel, nonce):
            if time.monotonic() > deadline:
                log.warning("the mirror has not seen refund %d of channel %s: its lane stays held until the "
                            "hold's TTL", nonce, to_hex(channel))
                return False
            time.sleep(self.poll_s)
        return True

    def _drop(self, lane: int, hold_id: str) -> None:
        ledger = self.x402.ledger
        with ledger.lanes.transaction() as tx:
            tx.drop_hold(self.x402.router, ledger.node, lane, hold_id, ledger.instance)
