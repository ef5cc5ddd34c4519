"""Paying for one request, start to finish: check the voucher, hold the max fee, charge. Money only:
the receipt is issued by the caller (node/api/receipt_issuer.py) for the fee decided here.

    hold(checked, max_fee)        -> a Hold, or the stored response when the voucher was used before
    finish(hold, usage, issue, build) -> (charged_total, response body with the signed receipt), committed
    cancel(hold)                  -> nothing charged (no token left the node)
    write_off(hold, usage, why)   -> nothing charged, the voucher spent, the tokens sent a recorded loss

Every hold ends in exactly one of a successful `finish`, `cancel` or `write_off`. While it lasts, its
voucher is in flight: the same voucher sent again is refused (409) at once, never generated twice.

The receipt is the node's EIP-712 `Receipt`; its id is its digest. It is committed with the charge
and the response in one transaction: no receipt, no response; no response, no charge.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.exc import InterfaceError, OperationalError, SQLAlchemyError

from node.chain.receipt_read import authorize_read
from node.db.loss import LossReason
from node.errors import DatabaseUnavailable, VoucherConflict, VoucherExpiresTooSoon
from node.payment.ledger import Ledger, Reservation
from node.payment.loss_spool import LossSpool, UnrecordedLoss
from node.payment.pricing import Pricing
from node.payment.voucher_check import CheckedVoucher, check_voucher
from node.protocol.eip712 import Domain
from node.protocol.receipt import SignedReceipt
from node.protocol.voucher import decode_payment_header

log = logging.getLogger(__name__)
GENERATION_SHARE_OF_HOLD = 0.9  # a generation ends by this share of the hold's life: the charge fits in the rest
DELIVERY_SHARE_OF_HOLD = 0.95  # a stream still being read by then is charged for what was sent, and ends


@dataclass(frozen=True)
class Hold:
    checked: CheckedVoucher
    reservation: Reservation
    pricing: Pricing  # the prices the request is charged at (the base model's or the adapters')


@dataclass(frozen=True)
class Replay:
    """The voucher was used before: here is the response it bought."""

    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)  # of the scheme it was paid in (PAYMENT-RESPONSE)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


class PaymentService:
    def __init__(self, ledger: Ledger, domain: Domain, node: str, pricing: Pricing, *,
                 min_validity_s: int = 30, clock: Callable[[], float] | None = None,
                 base_pricing: Pricing | None = None, loss_spool: LossSpool | None = None) -> None:
        self.ledger = ledger
        self.domain = domain
        self.node = node  # checksummed: the address vouchers must name
        self.pricing = pricing  # a request to an adapter
        self.base_pricing = base_pricing or pricing  # a request to the base model alone
        self.min_validity_s = min_validity_s
        # a voucher's time left is judged on the ledger's clock (the database's where replicas share one): a
        # replica whose own clock runs behind does not accept a voucher the others call too close to expiry
        self.clock = clock or ledger.clock
        self._in_flight: set[str] = set()  # vouchers holding a lane in this process
        self._in_flight_lock = threading.Lock()
        self.loss_spool = loss_spool  # write-offs the database refused, kept across restarts
        self._spool_lock = threading.Lock()
        spooled = loss_spool.entries() if loss_spool is not None else []
        self._in_flight.update(e.checked.digest_hex for e in spooled)  # spent in this process's earlier life
        self._has_unrecorded = bool(spooled)

    @property
    def max_generation_s(self) -> float:
        """How long a generation may run: it must be charged before its hold expires."""
        return self.ledger.max_hold.total_seconds() * GENERATION_SHARE_OF_HOLD

    @property
    def max_delivery_s(self) -> float:
        """How long a stream may take to be read: a client that reads slower is charged for what it was
        sent while the hold can still be charged (past it, the charge would be refused: a free answer)."""
        return self.ledger.max_hold.total_seconds() * DELIVERY_SHARE_OF_HOLD

    def check(self, header_value: str | None, body: bytes) -> CheckedVoucher:
        """The stateless checks: header format, node, request hash, signature (no database)."""
        return check_voucher(decode_payment_header(header_value), body, domain=self.domain, node=self.node)

    def pricing_for(self, is_base: bool) -> Pricing:
        return self.base_pricing if is_base else self.pricing

    @property
    def quote_pricing(self) -> Pricing:
        """Prices no request exceeds, whichever model it names: what a quote for any request is made of."""
        a, b = self.pricing, self.base_pricing
        return Pricing(max(a.prompt_token_price, b.prompt_token_price),
                       max(a.completion_token_price, b.completion_token_price), max(a.min_fee, b.min_fee))

    def hold(self, checked: CheckedVoucher, max_fee: int, pricing: Pricing | None = None,
             read: str | None = None) -> Hold | Replay:
        """Hold `max_fee` on the lane, for a request charged at `pricing` (default: the adapters'); a voucher
        already served gets its stored response instead (an idempotent retry: the same answer, no new
        charge), once it is in an epoch only with `read`, its payer's X-Receipt-Read of its receipt. Only
        new vouchers need time left to run."""
        deadline, now = checked.voucher.deadline, int(self.clock())

        def fresh_enough() -> None:
            if deadline < now + self.min_validity_s:
                raise VoucherExpiresTooSoon(
                    f"the voucher expires in {deadline - now} s; this node needs at least {self.min_validity_s} s "
                    "left to settle it", deadline=deadline, now=now, min_validity_s=self.min_validity_s)

        self._refuse_unrecorded(checked.digest_hex)
        self._claim(checked.digest_hex)
        try:
            held = self.ledger.reserve(checked, max_fee, before_new=fresh_enough)
        except BaseException:
            self._unclaim(checked.digest_hex)
            raise
        if isinstance(held, dict):
            self._unclaim(checked.digest_hex)
            self._refuse_public_replay(checked, read)
            return Replay(held)
        return Hold(checked, held, pricing or self.pricing)

    def _refuse_unrecorded(self, voucher_hash: str) -> None:
        """Spooled write-offs go to the database first; a voucher whose write-off still waits there (this
        process's, an earlier life's or another replica's) is spent: 409."""
        spool = self.loss_spool
        if spool is None or not (self._has_unrecorded or spool.holds(voucher_hash)):
            return
        self.flush_unrecorded()
        if spool.holds(voucher_hash):
            raise VoucherConflict("this voucher was already used (its write-off waits for the database)",
                                  voucher_hash=voucher_hash)

    def _claim(self, voucher_hash: str) -> None:
        with self._in_flight_lock:
            if voucher_hash in self._in_flight:
                raise VoucherConflict("this voucher's request is in flight: wait for its answer (a voucher buys "
                                      "one generation)", voucher_hash=voucher_hash)
            self._in_flight.add(voucher_hash)

    def _unclaim(self, voucher_hash: str) -> None:
        with self._in_flight_lock:
            self._in_flight.discard(voucher_hash)

    def _refuse_public_replay(self, checked: CheckedVoucher, read: str | None) -> None:
        """A voucher in an epoch is published with its signature (the settle transaction): sent again,
        it proves nothing of who sends it, so its stored answer is replayed only with its payer's
        X-Receipt-Read of the receipt this 409 names (401/403 for any other); the payer may also read it
        at GET /v1/receipts/{id}."""
        settled = self.ledger.epoch_receipt(checked.digest_hex)
        if settled is not None and read is not None:
            authorize_read(read, settled[0], checked.payer, self.domain, self.clock())
        elif settled is not None:
            raise VoucherConflict("this voucher was already used and is settled on chain: its payer reads the "
                                  "answer with GET /v1/receipts/{id} and a signed X-Receipt-Read",
                                  receipt_id=settled[0], epoch_id=settled[1])

    def finish(self, hold: Hold, usage: Usage, issue: Callable[[int], SignedReceipt],
               build: Callable[[dict[str, Any]], dict[str, Any]]) -> tuple[int, dict[str, Any]]:
        """Charge for `usage` (at most the hold), and commit the receipt `issue(fee)` gives with
        `build(receipt json)` as the response."""
        fee = min(hold.pricing.fee(usage.prompt_tokens, usage.completion_tokens), hold.reservation.max_fee)
        signed = issue(fee)

        def respond(charged_total: int) -> dict[str, Any]:
            return build(signed.response_json(charged_total))

        try:
            charged = self.ledger.commit(hold.reservation, hold.checked, fee, signed, respond)
        except (OperationalError, InterfaceError) as exc:  # (on failure the caller cancels or writes off)
            raise DatabaseUnavailable("the node's database is not available; retry shortly",
                                      error=type(exc).__name__) from exc
        self._unclaim(hold.checked.digest_hex)
        return charged

    def cancel(self, hold: Hold) -> None:
        """Nothing left the node: release the hold; the same voucher may be sent again."""
        try:
            self.ledger.release(hold.reservation)
        finally:
            self._unclaim(hold.checked.digest_hex)

    def write_off(self, hold: Hold, usage: Usage, reason: LossReason, detail: str) -> None:
        """Tokens left the node and will not be charged: spend the voucher and record what they were worth
        as a loss. If even that cannot be written (the database is down), the write-off waits in the loss
        spool (node/payment/loss_spool.py) and the voucher stays in flight (409), in this process and in
        its next life: it never buys a second generation, and the loss is recorded once the database is
        back. Without a spool the voucher is refused for this process's life only."""
        amount = min(hold.pricing.fee(usage.prompt_tokens, usage.completion_tokens), hold.reservation.max_fee)
        voucher_hash = hold.checked.digest_hex
        try:
            self.ledger.write_off(hold.reservation, hold.checked, amount, reason, detail)
        except (SQLAlchemyError, DatabaseUnavailable) as exc:
            log.error("loss of %d on voucher %s (%s) NOT recorded yet, the database refused it: %s", amount,
                      voucher_hash, reason.value, type(exc).__name__)
            if self.loss_spool is not None:
                with self._spool_lock:
                    self.loss_spool.add(UnrecordedLoss(hold.reservation, hold.checked, amount, reason, detail))
                    self._has_unrecorded = True
            return
        self._unclaim(voucher_hash)
        log.warning("loss of %d on voucher %s: %s (%s)", amount, voucher_hash, reason.value, detail)

    def flush_unrecorded(self) -> int:
        """Write the spooled write-offs into the database (oldest first, stopping at the first it refuses);
        their vouchers are then spent there and leave this process's in-flight set. Returns how many wait."""
        if self.loss_spool is None:
            return 0
        with self._spool_lock:
            waiting = self.loss_spool.entries()
            for done, e in enumerate(waiting):
                try:
                    self.ledger.write_off(e.reservation, e.checked, e.amount, e.reason, e.detail)
                except (SQLAlchemyError, DatabaseUnavailable) as exc:
                    log.warning("%d spooled loss(es) wait for the database: %s", len(waiting) - done,
                                type(exc).__name__)
                    self._has_unrecorded = True
                    return len(waiting) - done
                self.loss_spool.remove(e)
                self._unclaim(e.checked.digest_hex)
                log.warning("loss of %d on voucher %s recorded from the spool (%s)", e.amount,
                            e.checked.digest_hex, e.reason.value)
            self._has_unrecorded = False
            return 0
