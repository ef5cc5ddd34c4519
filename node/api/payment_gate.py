"""What a paid request proves before its hold, what that lets it make the node do, and its hold.

The stateless checks of either scheme run first, before the adapter is loaded: a lane voucher's
header and signature, or an x402 payment's terms, channel and signature (no database, no chain). What
they prove names the `Caller` whose budget a cold load spends (node/api/cold_load.py): a checked
payer's own, everyone else's the free callers' bucket. Once the request's price is known, a request
with no payment, or an x402 payment the stateless checks refused, gets the 402 that offers both
schemes (an x402 refusal is kept until then: its 402 needs that price). Then `hold` takes the hold
of whichever scheme pays, and `payment_headers` gives an x402-paid answer its PAYMENT-RESPONSE.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from node.api.cold_load import Caller, ColdLoadGate, ColdLoads, buyer_keys, caller_of, lane_caller
from node.api.hang_up_budget import HangUpBudget, HangUps, Ticket
from node.api.shared_budget import SharedColdLoadGate, SharedCounts, SharedHangUpBudget
from node.lora.provider import AdapterRegistrar
from node.payment.pricing import Pricing
from node.payment.service import Hold, PaymentService, Replay
from node.payment.voucher_check import CheckedVoucher
from node.payment.x402.channel_check import X402Refused
from node.payment.x402.service import X402Checked, X402Payments, X402Voucher
from node.payment.x402.terms import Offer
from node.payment.x402.wire import PAYMENT_RESPONSE_HEADER, encode_header
from node.protocol.voucher import request_hash


@dataclass(frozen=True)
class Presented:
    """A request's payment as the stateless checks left it: a checked lane voucher, or (without one)
    the x402 payment's check or the reason it failed; neither: no payment."""

    voucher: CheckedVoucher | None
    x402: X402Checked | X402Refused | None = None


class PaymentGate:
    def __init__(self, payments: PaymentService, provider: AdapterRegistrar, offer: Offer | None = None,
                 x402: X402Payments | None = None, shared: SharedCounts | None = None) -> None:
        self.payments, self.offer, self.x402 = payments, offer, x402  # with an offer, unpaid is a 402
        # the budgets' counts: the replicas' in Redis (node/api/shared_budget.py), else this process's
        self.cold_loads: ColdLoads = ColdLoadGate(provider)
        self.hang_ups: HangUps = HangUpBudget()
        if shared is not None:
            self.cold_loads = SharedColdLoadGate(provider, shared, ColdLoadGate(provider))
            self.hang_ups = SharedHangUpBudget(shared, HangUpBudget())
        self.spendable: Callable[[str], int] = lambda payer: payments.ledger.channel(payer, 0).spendable

    def present(self, payment: str | None, body: bytes, x402: str | None) -> Presented:
        """The stateless checks: a lane voucher (401/400 here when it fails them, or when no payment
        comes to a node that offers nothing else), else the x402 payment's."""
        if payment or self.offer is None:
            return Presented(self.payments.check(payment, body))
        if x402 is None or self.x402 is None:
            return Presented(None)
        try:
            return Presented(None, self.x402.check(x402))
        except X402Refused as exc:
            return Presented(None, exc)

    def caller(self, presented: Presented) -> Caller | None:
        """Whose budget the request's cold load spends (None: the free callers' bucket)."""
        return caller_of(presented.voucher, presented.x402, self.spendable, self.x402)

    def quote_caller(self, payer: str | None) -> Caller | None:
        """A quote's: the payer it names (a name, not a proof: a budget of its own)."""
        return lane_caller(payer, self.spendable, quote=True) if payer is not None else None

    async def admit(self, adapter: str, caller: Caller | None) -> None:
        """Returns when `adapter` may be loaded for `caller`; Overloaded (429) when not now."""
        await self.cold_loads.admit(adapter, caller)

    def hang_up_ticket(self, presented: Presented) -> Ticket:
        """The request's standing with its payer's hang-up budget; 429 when its hang-ups spent it."""
        caller = self.caller(presented)
        return self.hang_ups.admit(caller.key if caller is not None else None)

    def x402_payment(self, presented: Presented, url: str, max_fee: int) -> X402Checked | None:
        """The checked x402 payment (None: a lane voucher pays); without one, the 402 offering both
        schemes for a request costing at most `max_fee`."""
        if presented.voucher is not None:
            return None
        assert self.offer is not None, "without an offer, no payment is refused by `present`"
        if isinstance(presented.x402, X402Checked):
            return presented.x402
        raise self.offer.challenge(url, max_fee, presented.x402) from presented.x402

    def hold(self, checked: CheckedVoucher | None, x402: X402Checked | None, max_fee: int, pricing: Pricing,
             url: str, read: str | None = None, body: bytes = b"") -> Hold | Replay:
        """The hold of whichever scheme pays (or, for a payment sent again, its stored answer); an x402
        payment off its channel's total gets the corrective 402, which carries the channel's state."""
        if checked is not None:
            return self.payments.hold(checked, max_fee, pricing, read)
        assert self.x402 is not None and self.offer is not None and x402 is not None
        try:
            return self.x402.hold_or_replay(x402, max_fee, pricing, request_hash(body), read)
        except X402Refused as exc:
            raise self.offer.challenge(url, max_fee, exc) from exc

    def payment_headers(self, hold: Hold, charged_total: int) -> dict[str, str]:
        """PAYMENT-RESPONSE of an x402-paid answer (`chargedAmount`, `channelState`). A stream's headers
        leave before its charge: its last chunk carries the same base64 value as `payment_response`."""
        if self.x402 is None or not isinstance(hold.checked, X402Voucher):
            return {}
        return {PAYMENT_RESPONSE_HEADER: encode_header(self.x402.payment_response(hold, charged_total))}

    def paid(self, voucher: CheckedVoucher) -> None:
        """A purchase with `voucher`: its payer's cold loads were paid for, and it is a buyer again."""
        self.cold_loads.paid(*buyer_keys(voucher))
        self.hang_ups.paid(*buyer_keys(voucher))
