"""The x402 v2 HTTP transport: `PAYMENT-REQUIRED` (on a 402), `PAYMENT-SIGNATURE` (a payment),
`PAYMENT-RESPONSE` (the answer's settlement), each standard base64 of UTF-8 JSON.

A payment is decoded into plain frozen values, refusing anything malformed with `BadRequest` before a
hash or a signature is computed (docs/x402.md, "What the node does on each header").
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any, Literal

from node.errors import BadRequest
from node.payment.x402.typed import SCHEME, ChannelConfig
from node.protocol.wire_header import unique_fields

PAYMENT_REQUIRED_HEADER = "PAYMENT-REQUIRED"
PAYMENT_SIGNATURE_HEADER = "PAYMENT-SIGNATURE"
PAYMENT_RESPONSE_HEADER = "PAYMENT-RESPONSE"
MAX_HEADER_CHARS = 16_384

Kind = Literal["deposit", "voucher", "refund"]


@dataclass(frozen=True)
class SignedVoucher:
    channel_id: bytes
    max_claimable: int
    signature: bytes


@dataclass(frozen=True)
class Deposit:
    """An ERC-3009 deposit authorization (to = the collector), as the client signed it."""

    amount: int
    valid_after: int
    valid_before: int
    salt: int
    signature: bytes


@dataclass(frozen=True)
class Payment:
    kind: Kind
    accepted: dict[str, Any]  # the requirements the client chose, echoed (checked against the node's)
    config: ChannelConfig
    voucher: SignedVoucher
    deposit: Deposit | None = None
    refund_amount: int | None = None  # refund: None = everything unclaimed

    @property
    def accepted_amount(self) -> int:
        return _uint(self.accepted.get("amount"), "accepted.amount")


def encode_header(value: dict[str, Any]) -> str:
    return base64.b64encode(json.dumps(value, separators=(",", ":")).encode()).decode()


def decode_header(header: str) -> dict[str, Any]:
    if len(header) > MAX_HEADER_CHARS:
        raise BadRequest("payment header too large", length=len(header))
    try:
        value = json.loads(base64.b64decode(header.strip(), validate=True), object_pairs_hook=unique_fields)
    except (binascii.Error, ValueError, UnicodeDecodeError, RecursionError) as exc:  # nested past node/api/app.py's
        raise BadRequest("payment header is not base64 of JSON (each field named once)", reason=str(exc)[:200]
                         ) from exc
    if not isinstance(value, dict):
        raise BadRequest("payment header must hold a JSON object")
    return value


def decode_payment(header: str) -> Payment:
    """A `PAYMENT-SIGNATURE` header for the batch-settlement scheme."""
    return parse_payment(decode_header(header))


def parse_payment(value: dict[str, Any]) -> Payment:
    """A batch-settlement `PaymentPayload` (the header's JSON, or a facilitator request's `paymentPayload`)."""
    if value.get("x402Version") != 2:
        raise BadRequest("only x402 version 2 is served", x402Version=repr(value.get("x402Version"))[:20])
    accepted, payload = _object(value, "accepted"), _object(value, "payload")
    if accepted.get("scheme") != SCHEME:
        raise BadRequest("unknown x402 scheme", scheme=repr(accepted.get("scheme"))[:40])
    kind = payload.get("type")
    if kind not in ("deposit", "voucher", "refund"):
        raise BadRequest("unknown batch-settlement payload type", type=repr(kind)[:40])
    config = _config(_object(payload, "channelConfig"))
    voucher = _voucher(_object(payload, "voucher"))
    deposit = _deposit(_object(payload, "deposit")) if kind == "deposit" else None
    refund = payload.get("amount")
    return Payment(kind, accepted, config, voucher, deposit,
                   _uint(refund, "amount") if kind == "refund" and refund is not None else None)


def _object(value: dict[str, Any], name: str) -> dict[str, Any]:
    inner = value.get(name)
    if not isinstance(inner, dict):
        raise BadRequest(f"payment {name} must be an object", field=name)
    return inner


def _uint(value: Any, name: str, bits: int | None = None) -> int:
    """A decimal string or integer, as x402 sends amounts; with `bits`, one the contract's type can hold."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise BadRequest(f"{name} must be a decimal string", field=name)
    text = str(value)
    if not (text.isascii() and text.isdigit()) or len(text) > 78:  # '²' and '٣' are digits to isdigit
        raise BadRequest(f"{name} must be a decimal string", field=name, value=text[:80])
    if bits is not None and int(text) >= 2**bits:
        raise BadRequest(f"{name} must fit a uint{bits}", field=name, value=text[:80])
    return int(text)


def _hex(value: Any, name: str, size: int | None = None) -> bytes:
    if not isinstance(value, str) or not value.startswith("0x"):
        raise BadRequest(f"{name} must be 0x-hex", field=name)
    try:
        raw = bytes.fromhex(value[2:])
    except ValueError as exc:
        raise BadRequest(f"{name} must be 0x-hex", field=name) from exc
    if size is not None and len(raw) != size:
        raise BadRequest(f"{name} must be {size} bytes", field=name, length=len(raw))
    return raw


def _config(raw: dict[str, Any]) -> ChannelConfig:
    delay = raw.get("withdrawDelay")
    if not isinstance(delay, int) or isinstance(delay, bool):
        raise BadRequest("channelConfig.withdrawDelay must be an integer", field="withdrawDelay")
    return ChannelConfig(raw.get("payer"), raw.get("payerAuthorizer"), raw.get("receiver"),  # type: ignore[arg-type]
                         raw.get("receiverAuthorizer"), raw.get("token"), delay,  # type: ignore[arg-type]
                         _hex(raw.get("salt"), "channelConfig.salt", 32))


def _voucher(raw: dict[str, Any]) -> SignedVoucher:
    return SignedVoucher(_hex(raw.get("channelId"), "voucher.channelId", 32),
                         _uint(raw.get("maxClaimableAmount"), "voucher.maxClaimableAmount"),
                         _hex(raw.get("signature"), "voucher.signature"))


def _deposit(raw: dict[str, Any]) -> Deposit:
    auth = _object(_object(raw, "authorization"), "erc3009Authorization")
    salt = int.from_bytes(_hex(auth.get("salt"), "salt", 32), "big")
    return Deposit(_uint(raw.get("amount"), "deposit.amount", 128), _uint(auth.get("validAfter"), "validAfter", 256),
                   _uint(auth.get("validBefore"), "validBefore", 256), salt,
                   _hex(auth.get("signature"), "erc3009Authorization.signature"))


def payment_response(network: str, payer: str, charged: int | None, channel_state: dict[str, Any], *,
                     transaction: str = "", amount: str = "") -> dict[str, Any]:
    """The `PAYMENT-RESPONSE` of a paid answer: `chargedAmount` (omitted for a refund) and the channel
    snapshot with `chargedCumulativeAmount`; `transaction`/`amount` only when tokens moved on chain."""
    extra: dict[str, Any] = {"channelState": channel_state}
    if charged is not None:
        extra["chargedAmount"] = str(charged)
    return {"success": True, "transaction": transaction, "network": network, "payer": payer, "amount": amount,
            "extra": extra}
