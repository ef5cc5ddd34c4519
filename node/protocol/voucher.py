"""The payer's signed Voucher, in every form it takes: one home for its fields, hashes and encodings.

    Voucher                     the EIP-712 struct, checked on creation
    voucher_digest / sign_voucher / recover_voucher_signer / voucher_typed_data   its EIP-712 hashing
    SignedVoucher               the voucher with the payer's 65-byte signature r||s||v
      .encode() / decode_payment_header()   the `X-Payment` header: base64url (no padding) of the UTF-8 JSON
          {"payer": "0x..", "node": "0x..", "lane": 0, "cumulative": "123", "requestHash": "0x..",
           "deadline": 1767225600, "signature": "0x<65 bytes r||s||v>"}
      .to_json() / from_json()  that JSON object, as a settle batch stores it
      .as_abi()                 the `(Voucher, signature)` tuple of Settlement's `settle`
      .columns() / from_row()   the `vouchers` row

`requestHash` is keccak256 of the exact bytes of the HTTP request body, so a voucher pays for one
request and no other. Decoding the header checks every field's type and range and names what is wrong.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from eth_hash.auto import keccak

from node.errors import BadRequest
from node.protocol.address import checksum_address
from node.protocol.eip712 import Domain, Fields, check_fields, digest, recover, sign_digest, struct_hash, type_hash
from node.protocol.eip712 import typed_data as _typed_data
from node.protocol.hexstr import from_hex, to_hex
from node.protocol.wire_header import decode_header, encode_header

VOUCHER_FIELDS: Fields = (("payer", "address"), ("node", "address"), ("lane", "uint32"), ("cumulative", "uint256"),
                          ("requestHash", "bytes32"), ("deadline", "uint64"))
VOUCHER_TYPEHASH = type_hash("Voucher", VOUCHER_FIELDS)
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
class Voucher:
    payer: str
    node: str
    lane: int
    cumulative: int
    request_hash: bytes  # keccak256 of the exact HTTP request body
    deadline: int  # unix seconds

    def __post_init__(self) -> None:
        check_fields(VOUCHER_FIELDS, self.values())

    def values(self) -> tuple[Any, ...]:
        """The fields in EIP-712 type order (VOUCHER_FIELDS)."""
        return (self.payer, self.node, self.lane, self.cumulative, self.request_hash, self.deadline)

    def as_abi(self) -> tuple[Any, ...]:
        """The Solidity `Voucher` struct as a tuple (addresses checksummed, as web3 wants them)."""
        return (checksum_address(self.payer), checksum_address(self.node), self.lane, self.cumulative,
                self.request_hash, self.deadline)


def request_hash(body: bytes) -> bytes:
    return bytes(keccak(body))


def voucher_typed_data(voucher: Voucher, domain: Domain) -> dict[str, Any]:
    return _typed_data("Voucher", VOUCHER_FIELDS, voucher.values(), domain)


def voucher_digest(voucher: Voucher, domain: Domain) -> bytes:
    """The 32 bytes the payer signs; also the `voucherHash` a receipt carries."""
    return digest(domain, struct_hash(VOUCHER_TYPEHASH, VOUCHER_FIELDS, voucher.values()))


def sign_voucher(key: str | bytes, voucher: Voucher, domain: Domain) -> bytes:
    return sign_digest(key, voucher_digest(voucher, domain))


def recover_voucher_signer(voucher: Voucher, domain: Domain, signature: bytes) -> str:
    return recover(voucher_digest(voucher, domain), signature)


class VoucherColumns(Protocol):
    """The columns of a stored voucher (`node.db.models.Voucher`) that hold what the payer signed."""

    payer: str
    node: str
    lane: int
    cumulative: int
    request_hash: str
    deadline: int
    signature: str


@dataclass(frozen=True)
class SignedVoucher:
    """A voucher as the payer sent it: its fields and its signature (not yet checked)."""

    payer: str
    node: str
    lane: int  # uint32
    cumulative: int  # uint256
    request_hash: bytes  # 32 bytes
    deadline: int  # unix seconds
    signature: bytes  # 65 bytes r||s||v

    @classmethod
    def of(cls, voucher: Voucher, signature: bytes) -> SignedVoucher:
        return cls(voucher.payer, voucher.node, voucher.lane, voucher.cumulative, voucher.request_hash,
                   voucher.deadline, signature)

    @property
    def voucher(self) -> Voucher:
        """The signed struct (checks every field's abi range)."""
        return Voucher(self.payer, self.node, self.lane, self.cumulative, self.request_hash, self.deadline)

    def to_json(self) -> dict[str, Any]:
        """The header's JSON object; also how a settle batch stores the voucher."""
        return {"payer": self.payer, "node": self.node, "lane": self.lane, "cumulative": str(self.cumulative),
                "requestHash": to_hex(self.request_hash), "deadline": self.deadline,
                "signature": to_hex(self.signature)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> SignedVoucher:
        """A voucher stored by `to_json` (trusted: the node wrote it; use `decode_payment_header` for input)."""
        return cls(d["payer"], d["node"], int(d["lane"]), int(d["cumulative"]), from_hex(d["requestHash"]),
                   int(d["deadline"]), from_hex(d["signature"]))

    def encode(self) -> str:
        """The `X-Payment` header value."""
        return encode_header(self.to_json())

    def as_abi(self) -> tuple[Any, ...]:
        """`(Voucher, signature)` as Settlement's `settle` takes each voucher."""
        return (self.voucher.as_abi(), self.signature)

    def columns(self) -> dict[str, Any]:
        """The `vouchers` row's columns for what the payer signed (the ledger adds hash, totals, times)."""
        return {"payer": self.payer, "node": self.node, "lane": self.lane, "cumulative": self.cumulative,
                "request_hash": to_hex(self.request_hash), "deadline": self.deadline,
                "signature": to_hex(self.signature)}

    @classmethod
    def from_row(cls, row: VoucherColumns) -> SignedVoucher:
        """A stored voucher (`vouchers` row)."""
        return cls(row.payer, row.node, row.lane, int(row.cumulative), from_hex(row.request_hash), row.deadline,
                   from_hex(row.signature))


# The name of the header form in the paid path and its tests: the same object.
PaymentHeader = SignedVoucher


def decode_payment_header(value: str | None) -> SignedVoucher:
    """The `X-Payment` header's voucher; BadRequest naming every field that is missing, unknown or out of range."""
    if not value:
        raise BadRequest("missing X-Payment header: sign a voucher for this request", param="X-Payment")
    if len(value) > MAX_HEADER_BYTES:
        raise BadRequest("X-Payment header too long", length=len(value), max_length=MAX_HEADER_BYTES)
    try:
        data = decode_header(value)
    except ValueError as exc:
        raise BadRequest("X-Payment is not base64url JSON", reason=str(exc)) from exc
    if not isinstance(data, dict):
        raise BadRequest("X-Payment JSON must be an object")
    return _parse(data)


def _parse(data: dict[str, Any]) -> SignedVoucher:
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
    return SignedVoucher(payer=checksum_address(data["payer"]), node=checksum_address(data["node"]),
                         lane=data["lane"], cumulative=int(data["cumulative"]),
                         request_hash=from_hex(data["requestHash"]), deadline=data["deadline"],
                         signature=from_hex(data["signature"]))


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
