"""The checks a batch-settlement voucher passes before any hold, with no chain read: the channel's
config binds its id and carries the node's terms, the voucher recovers to the committed payer
authorizer, it pays this request at the node's running total, and the mirrored deposit covers it
(docs/x402.md, "Verification"). A refusal names the spec's error code; the cumulative mismatch carries
what the client needs to resynchronise (the corrective 402)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from node.errors import BadSignature, PaymentError
from node.payment.x402.terms import CUMULATIVE_MISMATCH, X402Terms
from node.payment.x402.typed import ZERO_ADDRESS, channel_id, deposit_nonce, receive_digest, voucher_digest
from node.payment.x402.wire import Payment
from node.protocol.eip712 import Domain, recover

PREFIX = "invalid_batch_settlement_evm_"
EXCEEDS_BALANCE = PREFIX + "cumulative_exceeds_balance"
NOT_FINAL = PREFIX + "deposit_not_final"  # ours: the deposit covers it once final (docs/x402.md)
# how long a deposit authorization must stay valid past the chain's latest block: the deposit lands in a
# later block (a few blocks' time, a busy pool), and the token refuses it once `validBefore` is reached
DEPOSIT_LEAD_S = 60


class X402Refused(PaymentError):
    """A batch-settlement payment the node will not take: a 402 whose `error` is `reason`, the spec's
    code; `channel_state` / `voucher_state` are set on the corrective 402."""

    code: ClassVar[str] = "x402_refused"

    def __init__(self, message: str, reason: str, *, channel_state: dict[str, Any] | None = None,
                 voucher_state: dict[str, Any] | None = None, **facts: Any) -> None:
        super().__init__(message, reason=reason, **facts)
        self.reason = reason
        self.channel_state = channel_state
        self.voucher_state = voucher_state


@dataclass(frozen=True)
class ChannelView:
    """What the node knows of one channel: its own books and the indexer's mirror of the contract."""

    charged: int = 0  # chargedCumulativeAmount
    signed_max: int = 0  # the last accepted voucher's ceiling
    signature: bytes | None = None  # and its signature
    balance: int = 0
    total_claimed: int = 0
    pending_withdrawal: int = 0
    withdraw_requested_at: int = 0
    refund_nonce: int = 0
    final_balance: int | None = None  # what a reorg cannot remove (the mirror's); None: not known, all counts
    unfinal_credit: int = 0  # what the node serves against deposits not final yet (X402Terms.unfinal_credit)

    def channel_state(self, channel: bytes) -> dict[str, Any]:
        return {"channelId": "0x" + channel.hex(), "balance": str(self.balance),
                "totalClaimed": str(self.total_claimed), "withdrawRequestedAt": self.withdraw_requested_at,
                "refundNonce": str(self.refund_nonce), "chargedCumulativeAmount": str(self.charged)}

    def voucher_state(self) -> dict[str, Any] | None:
        if self.signature is None:
            return None
        return {"signedMaxClaimable": str(self.signed_max), "signature": "0x" + self.signature.hex()}


@dataclass(frozen=True)
class CheckedPayment:
    payment: Payment
    channel_id: bytes
    digest: bytes  # the voucher's EIP-712 digest: the receipt's voucherHash
    amount: int  # what this request may be charged at most (the client's accepted amount)


def check_terms(payment: Payment, terms: X402Terms) -> bytes:
    """The channel id, once the config binds it and carries exactly the node's terms."""
    accepted = payment.accepted
    if accepted.get("network") != terms.network:
        raise X402Refused("another network", PREFIX + "network_mismatch", network=str(accepted.get("network"))[:40])
    config = payment.config
    channel = channel_id(config, terms.chain_id)
    if channel != payment.voucher.channel_id:
        raise X402Refused("the channel config does not hash to the voucher's channel id",
                          PREFIX + "channel_id_mismatch")
    for reason, got, want in (("token_mismatch", config.token, terms.token),
                              ("receiver_mismatch", config.receiver, terms.router),
                              ("receiver_authorizer_mismatch", config.receiver_authorizer, terms.authorizer),
                              ("withdraw_delay_mismatch", config.withdraw_delay, terms.withdraw_delay_s)):
        if got != want:
            raise X402Refused(f"the channel's {reason.removesuffix('_mismatch')} is not this node's",
                              PREFIX + reason, got=str(got), expected=str(want))
    return channel


def check_signature(payment: Payment, terms: X402Terms, channel: bytes) -> bytes:
    """The voucher digest, once it recovers to the committed payer authorizer (ECDSA only)."""
    authorizer = payment.config.payer_authorizer
    if authorizer == ZERO_ADDRESS:
        raise X402Refused("vouchers must be signed by a payer authorizer key (ERC-1271 payers are not served)",
                          PREFIX + "voucher_signature")
    digest = voucher_digest(channel, payment.voucher.max_claimable, terms.chain_id)
    try:
        signer = recover(digest, payment.voucher.signature)
    except BadSignature as exc:
        raise X402Refused("the voucher signature does not recover", PREFIX + "voucher_signature") from exc
    if signer != authorizer:
        raise X402Refused("the voucher is not signed by the channel's payer authorizer", PREFIX + "voucher_signature",
                          signer=signer)
    return digest


def check_deposit_signature(payment: Payment, terms: X402Terms) -> None:
    """A deposit's ERC-3009 authorization recovers to its payer, before the node spends gas on it (the
    contract checks it again; a smart-wallet payer's ERC-1271 authorization is not served)."""
    deposit = payment.deposit
    assert deposit is not None, "not a deposit"
    domain = Domain(terms.chain_id, terms.token, name=terms.token_name, version=terms.token_version)
    nonce = deposit_nonce(payment.voucher.channel_id, deposit.salt)
    digest = receive_digest(domain, payment.config.payer, deposit.amount, deposit.valid_after, deposit.valid_before,
                            nonce)
    try:
        signer = recover(digest, deposit.signature)
    except BadSignature as exc:
        raise X402Refused("the deposit authorization does not recover", PREFIX + "receive_authorization_signature"
                          ) from exc
    if signer != payment.config.payer:
        raise X402Refused("the deposit authorization is not signed by the payer", PREFIX + "receive_authorization_"
                          "signature", signer=signer)


def check_min_deposit(payment: Payment, terms: X402Terms) -> None:
    """A deposit is at least the node's announced minimum: each one costs the node a transaction's gas."""
    deposit = payment.deposit
    assert deposit is not None, "not a deposit"
    if deposit.amount < terms.min_deposit:
        raise X402Refused("the deposit is below the node's minimum (extra.minDeposit)",
                          PREFIX + "deposit_below_min_deposit", amount=str(deposit.amount),
                          min_deposit=str(terms.min_deposit))


def check_payment(payment: Payment, terms: X402Terms, view: ChannelView, ceiling: int) -> CheckedPayment:
    """Everything before the hold, for a `voucher` or `deposit` payment of a request costing at most
    `ceiling`. A deposit counts its own amount as balance (it is submitted before the hold)."""
    channel = check_terms(payment, terms)
    digest = check_signature(payment, terms, channel)
    return CheckedPayment(payment, channel, digest, check_amounts(payment, view, ceiling, channel))


def check_amounts(payment: Payment, view: ChannelView, ceiling: int, channel: bytes) -> int:
    """The checks against the channel's state, of a payment whose terms and signature passed (the
    stateless half, done once per request): the accepted amount this request may be charged at most."""
    amount, ceiling_signed = payment.accepted_amount, payment.voucher.max_claimable
    if amount < ceiling:
        raise X402Refused("the accepted amount is below this request's price ceiling", PREFIX + "amount_below_price",
                          amount=str(amount), ceiling=str(ceiling))
    if ceiling_signed != view.charged + amount:
        raise X402Refused("the voucher's cumulative amount does not match the channel's charged total",
                          CUMULATIVE_MISMATCH, channel_state=view.channel_state(channel),
                          voucher_state=view.voucher_state())
    deposit = payment.deposit.amount if payment.deposit is not None else 0
    spendable = view.balance + deposit - view.pending_withdrawal
    if ceiling_signed > spendable:
        raise X402Refused("the voucher exceeds the channel's deposit", EXCEEDS_BALANCE,
                          spendable=str(spendable), max_claimable=str(ceiling_signed))
    if ceiling_signed <= view.total_claimed:
        raise X402Refused("the voucher is below what was claimed on chain", PREFIX + "cumulative_below_claimed")
    check_final(view, ceiling)
    return amount


def check_final(view: ChannelView, ceiling: int) -> None:
    """A reorg can remove a deposit that is not final yet: what the node has charged, and may charge for
    this request, stays within the channel's final balance plus its credit on deposits not final yet (at
    least one request's price: a deposit pays the request that carries it at once)."""
    if view.final_balance is None:
        return
    counted = view.final_balance + max(view.unfinal_credit, ceiling) - view.pending_withdrawal
    if view.charged + ceiling > counted:
        raise X402Refused("the channel's deposit is not final yet: retry once the chain has finalized it",
                          NOT_FINAL, final_balance=str(view.final_balance), charged=str(view.charged),
                          unfinal_credit=str(view.unfinal_credit))


def check_deposit_window(payment: Payment, chain_now: int) -> None:
    """A deposit's ERC-3009 authorization is valid when its transaction lands, judged by the chain's time
    (`chain_now`: the latest block's timestamp, as the token judges it), before the node spends gas on it:
    valid from before the latest block, and still valid `DEPOSIT_LEAD_S` past it (a deposit that expires
    before it lands reverts at the node's gas, and its payer, whose tokens never moved, may sign the next)."""
    deposit = payment.deposit
    assert deposit is not None, "not a deposit"
    if deposit.valid_before <= chain_now + DEPOSIT_LEAD_S:
        raise X402Refused(f"the deposit authorization expires before its deposit can land: validBefore must be "
                          f"more than {DEPOSIT_LEAD_S} s past the chain's time", PREFIX + "payload_authorization_"
                          "valid_before", valid_before=deposit.valid_before, chain_time=chain_now)
    if deposit.valid_after >= chain_now:
        raise X402Refused("the deposit authorization is not valid yet by the chain's time",
                          PREFIX + "payload_authorization_valid_after", valid_after=deposit.valid_after,
                          chain_time=chain_now)
