"""The node as the x402 facilitator of its own channels: `POST /verify`, `POST /settle`, `GET /supported`
with the bodies the x402 facilitator interface defines (docs/x402.md, "The node as its facilitator").

Verification is the scheme's facilitator rules against the chain, with no state of the node's books:
the requirements must be this node's terms (it is the channels' receiver authorizer, so it facilitates
no one else's), the config binds the channel id and carries those terms, the voucher recovers to the
payer authorizer, the channel has a balance (a deposit: the payer holds the amount), and the ceiling is
within the balance and above what was claimed. `/settle` submits deposits (gasless for the payer) and
serves `refund` payloads through the cooperative refund; the node claims and sweeps its channels itself,
in its epochs, so claim and settle requests are refused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from node.errors import BadRequest, ChainError
from node.payment.x402.chain_reads import ChannelReads
from node.payment.x402.channel_check import (
    PREFIX,
    X402Refused,
    check_deposit_signature,
    check_deposit_window,
    check_min_deposit,
    check_signature,
    check_terms,
)
from node.payment.x402.terms import X402Terms
from node.payment.x402.typed import SCHEME
from node.payment.x402.wire import Payment, encode_header, parse_payment

SIMULATION_FAILED = PREFIX + "deposit_simulation_failed"
_BALANCE_OF_ABI = [{"type": "function", "name": "balanceOf", "stateMutability": "view",
                    "inputs": [{"name": "owner", "type": "address"}], "outputs": [{"name": "", "type": "uint256"}]}]


class ChannelChain(Protocol):
    """What the facilitator needs of the chain (node.chain.x402_channels.X402Chain)."""

    def channel(self, channel_id: bytes) -> Any: ...

    def deposit(self, payment: Payment) -> Any: ...

    def deposit_used(self, payment: Payment) -> bool: ...

    def simulate_deposit(self, payment: Payment) -> None: ...

    def now(self) -> int: ...  # the latest block's timestamp


@dataclass(frozen=True)
class Verified:
    payment: Payment
    channel: bytes
    state: Any  # OnChainChannel

    def snapshot(self) -> dict[str, Any]:
        s = self.state
        return {"channelId": "0x" + self.channel.hex(), "balance": str(s.balance), "totalClaimed": str(s.total_claimed),
                "withdrawRequestedAt": s.withdraw_requested_at, "refundNonce": str(s.refund_nonce)}


class Facilitator:
    def __init__(self, terms: X402Terms, chain: ChannelChain, balance_of: Callable[[str, str], int],
                 reads: ChannelReads | None = None,
                 is_funded: Callable[[bytes], bool] = lambda channel: False,
                 submit_deposit: Callable[[Payment], Any] | None = None) -> None:
        self.terms, self.chain, self.balance_of = terms, chain, balance_of
        # the paid path's submission where the wiring gives it (X402Payments.submit_deposit_once: one per
        # channel across replicas until mined), so the same deposit sent twice at once is sent once
        self.submit_deposit = submit_deposit
        # anyone may ask: a channel is read within the bound on strangers' reads (the paid path's, shared
        # where the wiring gives it), never once per request, unless `is_funded` (the indexer's mirror
        # shows a deposit) says it is no stranger's (node/payment/x402/chain_reads.py)
        self.reads, self.is_funded = reads or ChannelReads(chain.channel), is_funded
        # the cooperative refund (X402Refunds.refund: a PAYMENT-SIGNATURE header -> PAYMENT-RESPONSE), set by
        # the wiring where the node serves refunds
        self.refund: Callable[[str], dict[str, Any]] | None = None

    def supported(self) -> dict[str, Any]:
        """One kind: batch-settlement on the node's chain, with the node as receiver authorizer (and relayer)."""
        kind = {"x402Version": 2, "scheme": SCHEME, "network": self.terms.network,
                "extra": {"receiverAuthorizer": self.terms.authorizer}}
        return {"kinds": [kind], "extensions": [], "signers": {"eip155:*": [self.terms.authorizer]}}

    def verify(self, body: Any) -> dict[str, Any]:
        payment = _payment(body)
        try:
            verified = self._verify(payment, _requirements(body))
        except X402Refused as exc:
            return {"isValid": False, "invalidReason": exc.reason, "invalidMessage": exc.message,
                    "payer": payment.config.payer}
        return {"isValid": True, "payer": payment.config.payer, "extra": verified.snapshot()}

    def settle(self, body: Any) -> dict[str, Any]:
        """A deposit goes on chain once verified; any other action is refused with the spec's code."""
        kind = _payload(body).get("type")
        network = self.terms.network
        if kind not in ("deposit", "voucher", "refund", "claim", "settle"):
            raise BadRequest("unknown batch-settlement payload type", type=repr(kind)[:40])
        if kind == "refund" and self.refund is not None:
            return self._refund(body)
        if kind != "deposit":
            why = ("the node claims and sweeps its own channels in its epochs" if kind in ("claim", "settle")
                   else "a voucher is charged by the node that serves the request" if kind == "voucher"
                   else "cooperative refunds need the channel mirror, which this node lacks")
            return {"success": False, "errorReason": PREFIX + "unknown_settle_action", "errorMessage": why,
                    "transaction": "", "network": network}
        payment = _payment(body)
        try:
            verified = self._verify(payment, _requirements(body))
            sent = (self.submit_deposit or self.chain.deposit)(payment)
            if sent is None:
                raise X402Refused("this deposit authorization was used already", PREFIX + "deposit_payload")
        except X402Refused as exc:
            return {"success": False, "errorReason": exc.reason, "errorMessage": exc.message, "transaction": "",
                    "network": network, "payer": payment.config.payer}
        except ChainError as exc:
            return {"success": False, "errorReason": PREFIX + "deposit_transaction_failed",
                    "errorMessage": exc.message, "transaction": "", "network": network,
                    "payer": payment.config.payer}
        self.reads.deposited(verified.channel)
        after = Verified(payment, verified.channel, self.chain.channel(verified.channel))
        deposit = payment.deposit
        assert deposit is not None
        return {"success": True, "transaction": sent["transactionHash"].to_0x_hex(), "network": network,
                "payer": payment.config.payer, "amount": str(deposit.amount), "asset": self.terms.token,
                "extra": {"channelState": after.snapshot()}}

    def _refund(self, body: Any) -> dict[str, Any]:
        """A `refund` payload through the node's cooperative refund (node/payment/x402/refund.py, what
        `GET /x402/refund` serves): the charge claimed with the refund voucher, the rest returned."""
        assert self.refund is not None
        payment = _payment(body)
        try:
            self._check_requirements(_requirements(body))
            return self.refund(encode_header(body["paymentPayload"]))
        except X402Refused as exc:
            return {"success": False, "errorReason": exc.reason, "errorMessage": exc.message, "transaction": "",
                    "network": self.terms.network, "payer": payment.config.payer}
        except ChainError as exc:
            return {"success": False, "errorReason": PREFIX + "refund_transaction_failed", "errorMessage": exc.message,
                    "transaction": "", "network": self.terms.network, "payer": payment.config.payer}

    def _verify(self, payment: Payment, requirements: dict[str, Any]) -> Verified:
        self._check_requirements(requirements)
        channel = check_terms(payment, self.terms)
        check_signature(payment, self.terms, channel)
        try:
            state = self.reads.get(channel, self.is_funded(channel))
        except ChainError as exc:
            raise X402Refused("the channel could not be read", PREFIX + "channel_state_read_failed") from exc
        ceiling, deposit = payment.voucher.max_claimable, payment.deposit
        if deposit is not None:
            self._check_deposit(payment, channel)
        elif state.balance == 0:
            raise X402Refused("no channel with a balance", PREFIX + "channel_not_found")
        if ceiling > state.balance + (deposit.amount if deposit else 0):
            raise X402Refused("the voucher exceeds the channel's balance", PREFIX + "cumulative_exceeds_balance")
        below = ceiling < state.total_claimed if payment.kind == "refund" else ceiling <= state.total_claimed
        if below:
            raise X402Refused("the voucher is below what was claimed on chain", PREFIX + "cumulative_below_claimed")
        return Verified(payment, channel, state)

    def _check_requirements(self, req: dict[str, Any]) -> None:
        """The requirements are this node's: it authorizes claims for its own router only."""
        raw_extra = req.get("extra")
        extra: dict[str, Any] = raw_extra if isinstance(raw_extra, dict) else {}
        if req.get("scheme") != SCHEME:
            raise X402Refused("only batch-settlement is facilitated", PREFIX + "scheme")
        if req.get("network") != self.terms.network:
            raise X402Refused("another network", PREFIX + "network_mismatch")
        for reason, got, want in (("token_mismatch", req.get("asset"), self.terms.token),
                                  ("receiver_mismatch", req.get("payTo"), self.terms.router),
                                  ("receiver_authorizer_mismatch", extra.get("receiverAuthorizer"),
                                   self.terms.authorizer)):
            if str(got).lower() != want.lower():
                raise X402Refused(f"the requirements' {reason.removesuffix('_mismatch')} is not this node's",
                                  PREFIX + reason)
        if extra.get("withdrawDelay") != self.terms.withdraw_delay_s:
            raise X402Refused("the requirements' withdraw delay is not this node's", PREFIX + "withdraw_delay_mismatch")

    def _check_deposit(self, payment: Payment, channel: bytes) -> None:
        deposit = payment.deposit
        assert deposit is not None
        check_min_deposit(payment, self.terms)
        check_deposit_signature(payment, self.terms)
        if not self.reads.may_ask(channel):  # a key that holds nothing signs deposits for free: within the bound
            raise X402Refused("too many deposits into new channels at once; retry shortly",
                              PREFIX + "channel_state_read_failed")
        check_deposit_window(payment, self.chain.now())  # the chain's time, as the token judges it
        if self.balance_of(payment.config.token, payment.config.payer) < deposit.amount:
            raise X402Refused("the payer does not hold the deposit", PREFIX + "insufficient_balance")
        # the spec's facilitator simulates the deposit: an authorization used already (this deposit sent
        # before) or anything else the contract refuses fails there
        if self.chain.deposit_used(payment):
            raise X402Refused("this deposit authorization was used already", SIMULATION_FAILED)
        try:
            self.chain.simulate_deposit(payment)
        except ChainError as exc:
            raise X402Refused(f"the deposit would revert: {exc.message}", SIMULATION_FAILED) from exc


def _payload(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict) or not isinstance(body.get("paymentPayload"), dict):
        raise BadRequest("the request must hold paymentPayload and paymentRequirements objects")
    payload = body["paymentPayload"].get("payload")
    if not isinstance(payload, dict):
        raise BadRequest("paymentPayload.payload must be an object", field="payload")
    return payload


def _payment(body: Any) -> Payment:
    _payload(body)
    return parse_payment(body["paymentPayload"])


def _requirements(body: Any) -> dict[str, Any]:
    req = body.get("paymentRequirements")
    if not isinstance(req, dict):
        raise BadRequest("paymentRequirements must be an object", field="paymentRequirements")
    return req


def erc20_balance_of(client: Any) -> Callable[[str, str], int]:
    """`balance_of(token, owner)`: one ERC-20 `balanceOf` through the node's contract client."""

    def balance_of(token: str, owner: str) -> int:
        w3 = client.w3
        erc20 = w3.eth.contract(address=w3.to_checksum_address(token), abi=_BALANCE_OF_ABI)
        return int(client.call(erc20.functions.balanceOf(w3.to_checksum_address(owner))))

    return balance_of
