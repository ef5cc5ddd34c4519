"""What the node announces on a 402: x402 v2 `PaymentRequired` listing our lane scheme and
`batch-settlement` on the node's chain, each priced at this request's ceiling (docs/x402.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from node.errors import PaymentError
from node.payment.x402.typed import MAX_WITHDRAW_DELAY_S, MIN_WITHDRAW_DELAY_S, SCHEME
from node.protocol.address import checksum_address

LANE_SCHEME = "loranode-lane"
CUMULATIVE_MISMATCH = "invalid_batch_settlement_evm_cumulative_amount_mismatch"


@dataclass(frozen=True)
class X402Terms:
    """The node's channel terms: a channel pays the node only when its config carries exactly these."""

    chain_id: int
    token: str
    token_name: str  # the token's EIP-712 domain name and version (ERC-3009 deposits are signed in it)
    token_version: str
    router: str  # payTo = ChannelConfig.receiver: the node's X402Router
    authorizer: str  # receiverAuthorizer: the node's operator key
    withdraw_delay_s: int
    max_timeout_s: int = 3600  # how long a deposit authorization may stay valid
    min_deposit: int = 0  # announced as `extra.minDeposit` when set: no smaller deposit is sent (gas)
    # per channel, what may be charged against deposits not final yet beyond one request's price (a reorg can
    # remove them): the node's loss to a deep reorg is at most this per channel (docs/x402.md)
    unfinal_credit: int = 10**17

    def __post_init__(self) -> None:
        if not MIN_WITHDRAW_DELAY_S <= self.withdraw_delay_s <= MAX_WITHDRAW_DELAY_S:
            raise ValueError(f"withdraw delay must be within {MIN_WITHDRAW_DELAY_S}..{MAX_WITHDRAW_DELAY_S} s")
        for name in ("token", "router", "authorizer"):
            object.__setattr__(self, name, checksum_address(getattr(self, name)))

    @property
    def network(self) -> str:
        return f"eip155:{self.chain_id}"

    def requirements(self, amount: int, *, channel_state: dict[str, Any] | None = None,
                     voucher_state: dict[str, Any] | None = None) -> dict[str, Any]:
        """The batch-settlement entry of `accepts`; the states only on a corrective 402."""
        extra: dict[str, Any] = {"receiverAuthorizer": self.authorizer, "withdrawDelay": self.withdraw_delay_s,
                                 "name": self.token_name, "version": self.token_version,
                                 "assetTransferMethod": "eip3009"}
        if self.min_deposit:
            extra["minDeposit"] = str(self.min_deposit)
        if channel_state is not None:
            extra["channelState"] = channel_state
        if voucher_state is not None:
            extra["voucherState"] = voucher_state
        return {"scheme": SCHEME, "network": self.network, "amount": str(amount), "asset": self.token,
                "payTo": self.router, "maxTimeoutSeconds": self.max_timeout_s, "extra": extra}


@dataclass(frozen=True)
class LaneTerms:
    """Our own scheme, listed first: x402 clients skip schemes they do not know."""

    chain_id: int
    token: str
    node: str
    settlement: str
    escrow: str

    def requirements(self, amount: int) -> dict[str, Any]:
        return {"scheme": LANE_SCHEME, "network": f"eip155:{self.chain_id}", "amount": str(amount),
                "asset": self.token, "payTo": self.node, "maxTimeoutSeconds": 0,
                "extra": {"header": "X-Payment", "settlement": self.settlement, "escrow": self.escrow,
                          "lanes": "/v1/channels/{payer}/{lane}", "docs": "docs/api.md"}}


def payment_required(url: str, accepts: list[dict[str, Any]], error: str | None = None) -> dict[str, Any]:
    """The x402 v2 `PaymentRequired` object (sent base64 in `PAYMENT-REQUIRED` and as the 402 body)."""
    out: dict[str, Any] = {"x402Version": 2, "resource": {"url": url, "mimeType": "application/json"},
                           "accepts": accepts}
    if error is not None:
        out["error"] = error
    return out


class PaymentChallenge(PaymentError):
    """402 with x402 v2 `PaymentRequired` (the API sends `required` as the PAYMENT-REQUIRED header):
    the request was not paid, or its x402 payment was refused (`reason`, the spec's code)."""

    code = "payment_required"

    def __init__(self, message: str, required: dict[str, Any], *, response: dict[str, Any] | None = None,
                 **facts: Any) -> None:
        super().__init__(message, **facts)
        self.required = required
        self.response = response  # a failed settlement's PAYMENT-RESPONSE, sent with the 402 when set


@dataclass(frozen=True)
class Offer:
    """Both schemes, priced per request: what a 402 lists."""

    lanes: LaneTerms
    x402: X402Terms | None = None

    def challenge(self, url: str, max_fee: int, refusal: Any = None) -> PaymentChallenge:
        """The 402 for a request costing at most `max_fee`; with `refusal` (an X402Refused) the spec's
        error and, on a cumulative mismatch, the corrective channel and voucher states."""
        accepts = [self.lanes.requirements(max_fee)]
        if self.x402 is not None:
            states = {"channel_state": refusal.channel_state, "voucher_state": refusal.voucher_state} if refusal else {}
            accepts.append(self.x402.requirements(max_fee, **states))
        reason = refusal.reason if refusal is not None else None
        message = refusal.message if refusal is not None else "payment required: pay with a lane voucher (X-Payment) " \
            "or x402 batch-settlement (PAYMENT-SIGNATURE)"
        return PaymentChallenge(message, payment_required(url, accepts, reason), reason=reason, max_fee=str(max_fee))
