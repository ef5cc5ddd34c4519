"""The `X-Payment` header: base64url (no padding) of the UTF-8 JSON of a signed voucher.

    {"payer": "0x..", "node": "0x..", "lane": 0, "cumulative": "123", "requestHash": "0x..",
     "deadline": 1767225600, "signature": "0x<65 bytes r||s||v>"}

`requestHash` is keccak256 of the exact bytes of the HTTP request body, so a voucher pays for one
request and no other. Decoding checks every field's type and range and names what is wrong.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Any

from eth_hash.auto import keccak

from node.errors import BadRequest
from node.protocol.address import checksum_address

MAX_HEADER_BYTES = 4096
UINT256_MAX = 2**256 - 1
# The voucher's deadline is a uint64 on chain but a signed BIGINT in the database (both backends): a
# deadline past 2^63 - 1 (the year 292 billion) can only be an attack on the column, so it is refused
# here, before any work, rather than widening the column for values no honest client signs.
MAX_DEADLINE = 2**63 - 1
_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")
_HASH = re.compile(r"^0x[0-9a-fA-F]{64}$")
_SIGNATURE = re.compile(r"^0x[0-9a-fA-F]{130}$")
_DECIMAL = re.compile(r"^(0|[1-9][0-9]{0,77})$")
FIELDS = ("payer", "node", "lane", "cumulative", "requestHash", "deadline", "signature")


@dataclass(frozen=True)
class PaymentHeader:
    payer: str  # checksummed
    node: str  # checksummed
    lane: int  # uint32
    cumulative: int  # uint256
    request_hash: bytes  # 32 bytes
    deadline: int  # unix seconds, at most MAX_DEADLINE
    signature: bytes  # 65 bytes

    def encode(self) -> str:
        body = {"payer": self.payer, "node": self.node, "lane": self.lane, "cumulative": str(self.cumulative),
                "requestHash": "0x" + self.request_hash.hex(), "deadline": self.deadline,
                "signature": "0x" + self.signature.hex()}
        raw = json.dumps(body, separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def request_hash(body: bytes) -> bytes:
    return bytes(keccak(body))


def decode_payment_header(value: str | None) -> PaymentHeader:
    if not value:
        raise BadRequest("missing X-Payment header: sign a voucher for this request", param="X-Payment")
    if len(value) > MAX_HEADER_BYTES:
        raise BadRequest("X-Payment header too long", length=len(value), max_length=MAX_HEADER_BYTES)
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
        data = json.loads(raw.decode("utf-8"))
    except (binascii.Error, ValueError, UnicodeDecodeError) as exc:
        raise BadRequest("X-Payment is not base64url JSON", reason=str(exc)) from exc
    if not isinstance(data, dict):
        raise BadRequest("X-Payment JSON must be an object")
    return _parse(data)


def _parse(data: dict[str, Any]) -> PaymentHeader:
    problems = [f"missing {f}" for f in FIELDS if f not in data]
    problems += [f"unknown field {k}" for k in data if k not in FIELDS]
    if problems:
        raise BadRequest("bad X-Payment voucher: " + ", ".join(problems))
    checks = {
        "payer": isinstance(data["payer"], str) and _ADDRESS.fullmatch(data["payer"]),
        "node": isinstance(data["node"], str) and _ADDRESS.fullmatch(data["node"]),
        "lane": _is_int(data["lane"]) and 0 <= data["lane"] < 2**32,
        "cumulative": isinstance(data["cumulative"], str) and _DECIMAL.fullmatch(data["cumulative"])
        and int(data["cumulative"]) <= UINT256_MAX,
        "requestHash": isinstance(data["requestHash"], str) and _HASH.fullmatch(data["requestHash"]),
        "deadline": _is_int(data["deadline"]) and data["deadline"] >= 0,
        "signature": isinstance(data["signature"], str) and _SIGNATURE.fullmatch(data["signature"]),
    }
    bad = [name for name, ok in checks.items() if not ok]
    if bad:
        raise BadRequest("bad X-Payment voucher field(s): " + ", ".join(bad), fields=bad)
    if data["deadline"] > MAX_DEADLINE:
        raise BadRequest(f"bad X-Payment voucher: deadline {data['deadline']} is past what the node can store "
                         f"({MAX_DEADLINE}); sign a real expiry time", fields=["deadline"], max_deadline=MAX_DEADLINE)
    return PaymentHeader(payer=checksum_address(data["payer"]), node=checksum_address(data["node"]),
                         lane=data["lane"], cumulative=int(data["cumulative"]),
                         request_hash=bytes.fromhex(data["requestHash"][2:]), deadline=data["deadline"],
                         signature=bytes.fromhex(data["signature"][2:]))


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
