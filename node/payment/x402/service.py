"""Paying one request with x402 `batch-settlement` (docs/x402.md, "Ledger mapping").

A channel is a lane of the node's router: the node turns each accepted x402 voucher into a lane
voucher it signs itself, `Voucher{payer: router, node, lane: the channel's, cumulative: the x402
ceiling, requestHash: the x402 voucher's digest, deadline: never}`. From the hold on, the lane path
does the rest unchanged (PaymentService.finish / cancel / write_off, the same receipts, epochs and
split), and Settlement collects the lane from the router's escrow account once the router has claimed
and swept the channel (the router's ERC-1271 signature is the node's).

    check(header)              -> X402Checked: the stateless checks (terms, channel id, signature)
    hold(checked, max_fee, p)  -> a lane Hold, after the checks against the channel's books and deposit
    hold_or_replay(...)        -> the same, or the stored answer of a voucher sent again for its request (free)
    payment_response(hold, t)  -> the PAYMENT-RESPONSE object of the charged answer
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from node.chain.receipt_read import authorize_read
from node.chain.tx_store import db_lock
from node.db.models import Voucher as VoucherRow
from node.errors import BadRequest, ChainError, Overloaded, VoucherConflict
from node.payment.lane import HoldView
from node.payment.ledger import Reservation
from node.payment.pricing import Pricing
from node.payment.service import Hold, PaymentService, Replay
from node.payment.voucher_check import CheckedVoucher
from node.payment.x402.book import ChannelBook, ChannelEntry
from node.payment.x402.chain_reads import ChannelReads, OnChain, ReadChannel, ReadMirror, has_anything
from node.payment.x402.channel_check import (
    EXCEEDS_BALANCE,
    PREFIX,
    ChannelView,
    X402Refused,
    check_amounts,
    check_deposit_signature,
    check_deposit_window,
    check_min_deposit,
    check_signature,
    check_terms,
)
from node.payment.x402.facilitator import Facilitator
from node.payment.x402.replay import answers, as_sent, may_be_public, receipt_of
from node.payment.x402.terms import CUMULATIVE_MISMATCH, X402Terms
from node.payment.x402.typed import voucher_digest as x402_voucher_digest
from node.payment.x402.wire import PAYMENT_RESPONSE_HEADER, Payment, decode_payment, encode_header, payment_response
from node.protocol.eip712 import sign_digest
from node.protocol.hexstr import to_hex
from node.protocol.voucher import Voucher, voucher_digest

NEVER = 2**63 - 1  # the router lane voucher's deadline (the node's own, valid until collected; fits BIGINT)


SubmitDeposit = Callable[[Payment], object]
SimulateDeposit = Callable[[Payment], None]  # ChainError when the deposit would revert


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
    request: bytes = b""  # keccak256 of the request body it pays for (kept with its answer: x402/replay.py)


class X402Payments:
    def __init__(self, payments: PaymentService, book: ChannelBook, terms: X402Terms, node_key: str,
                 read_channel: ReadChannel, submit_deposit: SubmitDeposit, *, chain_now: Callable[[], int],
                 read_mirror: ReadMirror | None = None, simulate_deposit: SimulateDeposit | None = None) -> None:
        self.payments, self.book, self.terms = payments, book, terms
        self.node_key = node_key
        self.chain_now = chain_now  # the latest block's timestamp: a deposit's authorization is judged by it
        # a deposit is simulated (an eth_call) before the lock its submission takes; None: only submitted
        self.submit_deposit, self.simulate_deposit = submit_deposit, simulate_deposit
        # The hold reads the indexer's mirror (`read_mirror`, node/payment/x402/channel_mirror.py) and the
        # chain (`read_channel`) only where the mirror's balance falls short (a deposit not indexed yet).
        # Without a mirror the chain state is read at most every `chain_reads.ttl_s` (2 s): a withdrawal seen that
        # much later still finishes only after the delay, which the settlement worker's claim beats
        # (node/settlement/x402_guard.py); a deposit is always read again. Strangers' channels (nothing
        # in them) are read at a bounded rate (node/payment/x402/chain_reads.py).
        self.read_mirror = read_mirror
        self.chain_reads = ChannelReads(read_channel)
        self._deposit_lock = threading.Lock()
        self.ledger = payments.ledger
        self.router = terms.router.lower()
        self.facilitator: Facilitator | None = None  # /x402/verify, /settle, /supported (set by the wiring)

    def check(self, header: str) -> X402Checked:
        payment = decode_payment(header)
        if payment.kind == "refund":
            raise BadRequest("a refund buys no answer: ask for it at GET /x402/refund (docs/x402.md)",
                             type="refund")
        channel = check_terms(payment, self.terms)
        return X402Checked(payment, channel, check_signature(payment, self.terms, channel))

    def hold_or_replay(self, checked: X402Checked, max_fee: int, pricing: Pricing, request: bytes,
                       read: str | None = None) -> Hold | Replay:
        """`hold`, or, for a voucher it refuses as off the channel's total that bought an answer to this very
        request (a payment sent again), `replay`: looked up only then, so paying costs no extra read."""
        try:
            return self.hold(checked, max_fee, pricing, request)
        except X402Refused as exc:
            replayed = self.replay(checked, request, read) if exc.reason == CUMULATIVE_MISMATCH else None
            if replayed is None:
                raise
            return replayed

    def replay(self, checked: X402Checked, request: bytes, read: str | None = None) -> Replay | None:
        """The stored answer of the voucher sent again for the request it answered (node/payment/x402/replay.py),
        free, with a PAYMENT-RESPONSE naming the channel's charged total; once the channel's vouchers may be
        public, only with `read`, the channel payer's X-Receipt-Read of the receipt the 409 names. None for
        a voucher never accepted, or accepted for another request (no second generation on one voucher:
        the corrective 402 stands)."""
        lane = self.book.find_lane(checked.channel_id)
        if lane is None:
            return None
        digest = to_hex(self._lane_digest(lane, checked.payment.voucher.max_claimable, checked.digest))
        with self.ledger.factory() as session:
            row = session.get(VoucherRow, digest)
            stored = row.response if row is not None else None
            if stored is None or not answers(stored, request):
                return None
            view = self._view(checked, self.ledger.channel(self.router, lane).charged_total)
            now = datetime.fromtimestamp(self.ledger.clock(), UTC)
            if may_be_public(session, view, self.router, self.ledger.node, lane, now - self.ledger.ttl):
                self._authorize(checked, receipt_of(session, digest), read)
        response = payment_response(self.terms.network, checked.payment.config.payer, int(stored["receipt"]["fee"]),
                                    view.channel_state(checked.channel_id))
        return Replay(as_sent(stored), {PAYMENT_RESPONSE_HEADER: encode_header(response)})

    def _authorize(self, checked: X402Checked, receipt_id: str, read: str | None) -> None:
        """Pass with the channel payer's X-Receipt-Read of `receipt_id`; else 409 naming it (401/403 for a
        read that is not the payer's)."""
        if read is None:
            raise VoucherConflict("this voucher was already used and its channel is claimed on chain: its payer "
                                  "reads the answer with GET /v1/receipts/{id} and a signed X-Receipt-Read, or "
                                  "sends the payment again with it", receipt_id=receipt_id)
        authorize_read(read, receipt_id, checked.payment.config.payer, self.payments.domain, self.payments.clock())

    def hold(self, checked: X402Checked, max_fee: int, pricing: Pricing | None = None, request: bytes = b"") -> Hold:
        """Hold `max_fee` on the channel's lane: refused (402, the spec's codes) unless the voucher pays
        this request (whose body hashes to `request`) on top of what the channel was charged and its deposit
        covers it. A deposit is
        submitted on chain first (the node pays the gas), before the router's lock that every x402 hold
        takes: no other payer waits for its block. A channel with nothing in it gets no row in the books."""
        payment, deposit_tx = checked.payment, ""
        if payment.deposit is not None:
            deposit_tx = self._deposit(checked, max_fee)
        else:
            self._check_funded(checked)
        lane_id = self.book.lane_of(checked.channel_id, payment.config)
        lane_voucher = Voucher(self.terms.router, self.payments.node, lane_id, payment.voucher.max_claimable,
                               checked.digest, NEVER)
        digest = voucher_digest(lane_voucher, self.payments.domain)
        now = datetime.fromtimestamp(self.ledger.clock(), UTC)
        # one channel's lock and lane: channels are separate accounts, so the router's other lanes (one
        # per payer channel) are neither read nor waited for
        with self.ledger.lanes.transaction(lock_payer=self.router, node=self.ledger.node, lock_lane=lane_id) as tx:
            seen = tx.lane_view(self.router, self.ledger.node, lane_id, to_hex(digest))
            view = self._accept(checked, seen, max_fee, now)
            tx.put_hold(self.router, self.ledger.node, lane_id, max_fee, to_hex(digest), now, self.ledger.instance)
            self.book.record_voucher(checked.channel_id, payment.voucher.max_claimable, payment.voucher.signature, tx)
        signature = sign_digest(self.node_key, digest)  # the digest above: hashed once
        v = lane_voucher
        signed = X402Voucher(v.payer, v.node, v.lane, v.cumulative, v.request_hash, v.deadline, signature, digest,
                             checked, view, deposit_tx, request)
        reservation = Reservation(self.router, self.ledger.node, lane_id, signed.digest_hex,
                                  lane_voucher.cumulative, max_fee, seen.lane.charged_total)
        return Hold(signed, reservation, pricing or self.payments.pricing)

    def _accept(self, checked: X402Checked, seen: HoldView, max_fee: int, now: datetime) -> ChannelView:
        """The channel's state once the voucher may hold it (a deposit submitted and seen on chain)."""
        lane, payment = seen.lane, checked.payment
        view = self._view(checked, lane.charged_total)
        if seen.is_used:  # served already: its charge moved the total on (never a second generation)
            raise self._corrective(checked, view, "this voucher was already used")
        if lane.reserved_voucher_hash and lane.reserved_at and now - lane.reserved_at < self.ledger.ttl:
            raise X402Refused("another request holds this channel: retry shortly", PREFIX + "channel_busy")
        return self._check(checked, replace(payment, deposit=None), view, max_fee)  # a deposit is on chain by now

    def _deposit(self, checked: X402Checked, max_fee: int) -> str:
        """Submit the payment's deposit once it would pay this request at the channel's charged total as
        read now (outside the lock: the hold checks again under it, on the chain's state after it); its
        transaction's hash. Below the announced minimum, or with an authorization its payer did not sign,
        it is refused before the node spends any gas."""
        lane = self.book.find_lane(checked.channel_id)  # written down once its deposit is in
        charged = self.ledger.channel(self.router, lane).charged_total if lane is not None else 0
        self._check(checked, checked.payment, self._view(checked, charged), max_fee)
        check_min_deposit(checked.payment, self.terms)
        check_deposit_signature(checked.payment, self.terms)
        self._simulate(checked)
        try:
            sent = self.submit_deposit_once(checked.payment)
        except ChainError as exc:  # the payer's authorization does not move its tokens (spent, expired, forged)
            reason = "deposit_simulation_failed" if "error" in exc.facts else "deposit_transaction_failed"
            raise X402Refused(f"the channel contract refused the deposit: {exc.message}", PREFIX + reason,
                              **exc.facts) from exc
        self.chain_reads.deposited(checked.channel_id)
        return _tx_hash(sent)

    def submit_deposit_once(self, payment: Payment) -> object:
        """Submit `payment`'s deposit (None: its authorization was used, the deposit is in): one at a time
        in this process (each is a transaction of the node's key, one nonce each), and one per channel in
        the database until mined, so another replica (or the facilitator's /settle) sent the same payment
        finds its authorization used and submits nothing (else it reverted: the node's gas for nothing)."""
        shared = db_lock(self.ledger.factory.kw["bind"], "x402-deposit:" + to_hex(payment.voucher.channel_id))
        with self._deposit_lock, shared:
            sent = self.submit_deposit(payment)
        self.book.add_gas(payment.voucher.channel_id, payment.config, _gas_used(sent))  # the channel's fees pay it
        return sent

    def _simulate(self, checked: X402Checked) -> None:
        """Ask the chain about a deposit before the lock every deposit takes (one nonce at a time): one the
        contract refuses (a payer that holds nothing signs for free) never holds the lock, and a stranger's
        is asked within the strangers' calls (429 beyond them)."""
        if not self.chain_reads.may_ask(checked.channel_id):
            raise Overloaded("too many deposits into new channels at once; retry shortly")
        check_deposit_window(checked.payment, self.chain_now())  # one that expires before it lands: no gas
        if self.simulate_deposit is None:
            return
        try:
            self.simulate_deposit(checked.payment)
        except ChainError as exc:
            raise X402Refused(f"the channel contract refused the deposit: {exc.message}",
                              PREFIX + "deposit_simulation_failed", **exc.facts) from exc

    def _check_funded(self, checked: X402Checked) -> None:
        """A voucher above what its channel holds is refused before the channel is written down (anyone
        can sign vouchers for empty channels of fresh keys, as many as they like): the mirror's balance,
        or the chain's where the mirror's falls short."""
        ceiling = checked.payment.voucher.max_claimable
        view = self._view(checked, 0)
        if ceiling > view.balance - view.pending_withdrawal and self.read_mirror is not None:
            view = self._live(checked, view)
        if ceiling > view.balance - view.pending_withdrawal:
            raise X402Refused("the voucher exceeds the channel's deposit", PREFIX + "cumulative_exceeds_balance",
                              spendable=str(view.balance - view.pending_withdrawal), max_claimable=str(ceiling))

    def _check(self, checked: X402Checked, payment: Payment, view: ChannelView, max_fee: int) -> ChannelView:
        """The view `payment` passes on: the mirror's, or the chain's where the mirror's balance falls
        short; a cumulative mismatch is answered with the corrective 402."""
        try:
            try:
                check_amounts(payment, view, max_fee, checked.channel_id)
                return view
            except X402Refused as exc:
                if exc.reason != EXCEEDS_BALANCE or self.read_mirror is None:
                    raise
            view = self._live(checked, view)
            check_amounts(payment, view, max_fee, checked.channel_id)
            return view
        except X402Refused as exc:
            if exc.reason != CUMULATIVE_MISMATCH:
                raise
            raise self._corrective(checked, view, exc.message) from exc

    def _live(self, checked: X402Checked, mirrored: ChannelView) -> ChannelView:
        """The chain's view (maybe up to `chain_reads.ttl_s` old), keeping what the mirror has seen since (a
        withdrawal, a claim)."""
        funded = bool(mirrored.balance or mirrored.total_claimed)  # paid into: never counted as a stranger's
        live = self._view(checked, mirrored.charged, live=True, known=funded)
        return replace(live, pending_withdrawal=max(live.pending_withdrawal, mirrored.pending_withdrawal),
                       withdraw_requested_at=max(live.withdraw_requested_at, mirrored.withdraw_requested_at),
                       total_claimed=max(live.total_claimed, mirrored.total_claimed),
                       final_balance=mirrored.final_balance)  # a deposit the mirror has not seen is not final

    def corrective(self, checked: X402Checked, charged: int, message: str) -> X402Refused:
        """The corrective 402 of a channel charged `charged` (for a refund voucher off the charged total)."""
        return self._corrective(checked, self._view(checked, charged), message)

    def _corrective(self, checked: X402Checked, view: ChannelView, message: str) -> X402Refused:
        """The corrective 402: the channel's state with the last voucher its payer signed (read only here)."""
        entry = self.book.entry(checked.channel_id, checked.payment.config)
        # an unspent voucher (its hold released, nothing charged) pays whoever presents it next: shown
        # only once spent (a client that lost its state then resyncs from the chain, as the SDK does)
        signature = entry.signature if entry.signature and self._is_spent(entry, checked.channel_id) else None
        latest = replace(view, signed_max=entry.signed_max, signature=signature)
        return X402Refused(message, CUMULATIVE_MISMATCH, channel_state=latest.channel_state(checked.channel_id),
                           voucher_state=latest.voucher_state())

    def _is_spent(self, entry: ChannelEntry, channel: bytes) -> bool:
        """Whether the channel's latest voucher bought a generation (its router lane voucher is stored)."""
        digest = self._lane_digest(entry.lane, entry.signed_max,
                                   x402_voucher_digest(channel, entry.signed_max, self.terms.chain_id))
        with self.ledger.factory() as session:
            return session.get(VoucherRow, to_hex(digest)) is not None

    def _lane_digest(self, lane: int, max_claimable: int, x402_digest: bytes) -> bytes:
        """The digest of the router lane voucher the node signs for an x402 voucher: its id in the ledger."""
        voucher = Voucher(self.terms.router, self.payments.node, lane, max_claimable, x402_digest, NEVER)
        return voucher_digest(voucher, self.payments.domain)

    def unclaimed(self, checked: X402Checked) -> int:
        """What the channel could still pay: its deposit less what is being withdrawn and what the node
        charged (or claimed). The mirror's (or a cached chain read); what lets a checked channel make the
        node load a cold adapter."""
        lane = self.book.find_lane(checked.channel_id)
        charged = self.ledger.channel(self.router, lane).charged_total if lane is not None else 0
        view = self._view(checked, charged)
        return max(view.balance - view.pending_withdrawal - max(charged, view.total_claimed), 0)

    def is_funded(self, channel: bytes) -> bool:
        """Whether the indexer's mirror shows something in `channel` (False without a mirror)."""
        return self.read_mirror is not None and has_anything(self.read_mirror(channel))

    def _view(self, checked: X402Checked, charged: int, live: bool = False, known: bool = False) -> ChannelView:
        """The mirror's view, or the chain's (`live`, or without a mirror; `known`: the channel is funded)."""
        mirror, channel = self.read_mirror, checked.channel_id
        if live or mirror is None:
            chain: OnChain = self.chain_reads.get(channel, known)
            final = None
        else:
            mirrored = mirror(channel)
            chain, final = mirrored, mirrored.balance - mirrored.pending_deposits
        return ChannelView(charged, 0, None, chain.balance, chain.total_claimed, chain.pending_withdrawal,
                           chain.withdraw_requested_at, chain.refund_nonce, final, self.terms.unfinal_credit)

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


def _gas_used(receipt: Any) -> int:
    """A mined transaction's gas (0 for none: nothing sent)."""
    return int(receipt["gasUsed"]) if receipt else 0


def _tx_hash(receipt: Any) -> str:
    """A submitted transaction's hash as 0x-hex ("" for none)."""
    if not receipt:
        return ""
    value = receipt["transactionHash"]
    return value if isinstance(value, str) else "0x" + bytes(value).hex()
