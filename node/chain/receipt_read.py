"""The `X-Receipt-Read` header: a payer's EIP-712 `ReceiptRead` that lets it, and nobody else, read
the text of one of its receipts (the output, and method 2's evidence spans, which are output text).

    base64url (no padding) of the UTF-8 JSON
    {"receiptId": "0x<32 bytes>", "payer": "0x<address>", "deadline": 1767225600, "signature": "0x<65 bytes>"}

The node accepts it only for the receipt it names, until its deadline, and only with a deadline at
most MAX_READ_VALIDITY_S ahead, so a leaked header opens one receipt for a few minutes at most.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

from eth_hash.auto import keccak

from node.errors import BadSignature, NotThePayer, ReadUnauthorized
from node.protocol.address import checksum_address
from node.protocol.eip712 import Domain, ReceiptRead, recover_receipt_read_signer, sign_receipt_read
from node.protocol.hexstr import from_hex, to_hex
from node.protocol.wire_header import decode_header, encode_header

HEADER = "X-Receipt-Read"
MAX_READ_VALIDITY_S = 300
MAX_HEADER_BYTES = 1024
_HASH = re.compile(r"^0x[0-9a-fA-F]{64}$")
_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")
_SIGNATURE = re.compile(r"^0x[0-9a-fA-F]{130}$")


@dataclass(frozen=True)
class SignedRead:
    read: ReceiptRead
    signature: bytes


def sign_read(key: str, payer: str, receipt_id: str, domain: Domain, validity_s: int = 60) -> str:
    """The header value with which `payer` (whose key is `key`) reads receipt `receipt_id`."""
    read = ReceiptRead(from_hex(receipt_id), checksum_address(payer), int(time.time()) + validity_s)
    signature = sign_receipt_read(key, read, domain)
    body = {"receiptId": receipt_id.lower(), "payer": read.payer, "deadline": read.deadline,
            "signature": to_hex(signature)}
    return encode_header(body)


def lane_read_id(node: str, lane: int) -> str:
    """The id a `ReceiptRead` names to read the payer's own last voucher on `lane` at `node` (GET
    /v1/channels): a voucher with its signature replays its stored answer to whoever also has the
    request's bytes. The nodes of one Settlement share its EIP-712 domain, so the id names the node: a
    read sent to one node opens nothing at another."""
    return to_hex(keccak(b"loranode lane read" + from_hex(node) + lane.to_bytes(32, "big")))


def channel_read_id(node: str, channel_id: str) -> str:
    """The id a `ReceiptRead` names to list the receipts of x402 channel `channel_id` (0x bytes32) at `node`
    (GET /v1/x402/channels/{channelId}/receipts), signed by the channel's payer."""
    return to_hex(keccak(b"loranode x402 channel read" + from_hex(node) + from_hex(channel_id)))


def decode_read(value: str) -> SignedRead:
    """The header's ReceiptRead and signature; ReadUnauthorized naming what is malformed."""
    if len(value) > MAX_HEADER_BYTES:
        raise ReadUnauthorized(f"{HEADER} is too long", length=len(value), max_length=MAX_HEADER_BYTES)
    try:
        data = decode_header(value)
    except ValueError as exc:
        raise ReadUnauthorized(f"{HEADER} is not base64url JSON", reason=str(exc)[:200]) from exc
    if not isinstance(data, dict) or not _well_formed(data):
        raise ReadUnauthorized(f"{HEADER} must be a JSON object of receiptId (0x 32 bytes), payer (0x address), "
                               "deadline (integer unix seconds) and signature (0x 65 bytes)")
    read = ReceiptRead(from_hex(data["receiptId"]), checksum_address(data["payer"]), data["deadline"])
    return SignedRead(read, from_hex(data["signature"]))


def _well_formed(data: dict[str, Any]) -> bool:
    deadline = data.get("deadline")
    return (set(data) == {"receiptId", "payer", "deadline", "signature"}
            and isinstance(data["receiptId"], str) and bool(_HASH.fullmatch(data["receiptId"]))
            and isinstance(data["payer"], str) and bool(_ADDRESS.fullmatch(data["payer"]))
            and isinstance(deadline, int) and not isinstance(deadline, bool) and 0 <= deadline < 2**64
            and isinstance(data["signature"], str) and bool(_SIGNATURE.fullmatch(data["signature"])))


def authorize_read(value: str, receipt_id: str, payer: str, domain: Domain, now: float) -> None:
    """Pass if `value` is a current ReceiptRead of `receipt_id` signed by `payer`, the receipt's payer;
    ReadUnauthorized (401) if it is not a valid authorization, NotThePayer (403) if it is someone else's."""
    signed = decode_read(value)
    read, now_s = signed.read, int(now)
    if to_hex(read.receipt_id) != receipt_id.lower():
        raise ReadUnauthorized("the read authorization is for another receipt", receipt_id=receipt_id)
    if read.deadline <= now_s:
        raise ReadUnauthorized("the read authorization expired: sign a new one", deadline=read.deadline, now=now_s)
    if read.deadline > now_s + MAX_READ_VALIDITY_S:
        raise ReadUnauthorized(f"the read authorization's deadline is more than {MAX_READ_VALIDITY_S} s away",
                               deadline=read.deadline, now=now_s, max_validity_s=MAX_READ_VALIDITY_S)
    try:
        signer = recover_receipt_read_signer(read, domain, signed.signature)
    except BadSignature as exc:
        raise ReadUnauthorized(f"the read authorization's signature is invalid: {exc.message}") from exc
    if signer != read.payer:
        raise ReadUnauthorized("the read authorization's signature does not recover to the payer it names",
                               payer=read.payer, signer=signer)
    if signer.lower() != payer.lower():
        raise NotThePayer("only the payer of this receipt may read its text", receipt_id=receipt_id, signer=signer)
