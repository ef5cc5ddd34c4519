"""EIP-712 hashing of the protocol's structs (the Voucher in `voucher.py`, the Receipt in `receipt.py`),
and the ReceiptRead a payer signs to read its own receipt's text.

Domain: name "loranode", version "1", the chain id and the Settlement contract. Hashing is done here
directly because the API checks a voucher and signs a receipt on every request: every field of these
structs is a static abi type, so `abi.encode` is each value as one 32-byte word (checked by the
dataclasses before), behind the precomputed type hash; the domain separator is computed once per
domain. Signing and recovery call libsecp256k1 (coincurve) directly. `*_typed_data` gives the same
message as a wallet-ready JSON dict, and the tests hold the two against eth-account (byte for byte)
and against the contract's own `voucherDigest`.

Signatures are 65 bytes r||s||v with v in {27, 28} and s in the lower half of the curve order, which
is what OpenZeppelin's ECDSA accepts on chain; anything else is refused as `BadSignature`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from coincurve import PrivateKey, PublicKey
from eth_abi.abi import encode
from eth_hash.auto import keccak

from node.errors import BadRequest, BadSignature
from node.protocol.address import checksum_from_bytes
from node.protocol.hexstr import to_hex

SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141

RECEIPT_READ_FIELDS = (("receiptId", "bytes32"), ("payer", "address"), ("deadline", "uint64"))
DOMAIN_FIELDS = (("name", "string"), ("version", "string"), ("chainId", "uint256"),
                 ("verifyingContract", "address"))


Fields = tuple[tuple[str, str], ...]  # (name, abi type) of a struct's fields, in type order


def type_hash(name: str, fields: Fields) -> bytes:
    """keccak256 of the EIP-712 type string `Name(type1 name1,...)`."""
    return keccak((f"{name}(" + ",".join(f"{t} {n}" for n, t in fields) + ")").encode())


RECEIPT_READ_TYPEHASH = type_hash("ReceiptRead", RECEIPT_READ_FIELDS)
DOMAIN_TYPEHASH = type_hash("EIP712Domain", DOMAIN_FIELDS)


@dataclass(frozen=True)
class Domain:
    chain_id: int
    verifying_contract: str  # the Settlement contract
    name: str = "loranode"
    version: str = "1"

    def separator(self) -> bytes:
        return _separator(self)


@functools.lru_cache(maxsize=64)
def _separator(domain: Domain) -> bytes:
    return keccak(encode(["bytes32", "bytes32", "bytes32", "uint256", "address"],
                         [DOMAIN_TYPEHASH, keccak(domain.name.encode()), keccak(domain.version.encode()),
                          domain.chain_id, domain.verifying_contract]))


def _check(name: str, abi_type: str, value: Any) -> None:
    """Refuses a field its abi type cannot hold, so hashing never fails on malformed input."""
    if abi_type == "address":
        ok = isinstance(value, str) and len(value) == 42 and value[:2] in ("0x", "0X")
        ok = ok and all(c in "0123456789abcdefABCDEF" for c in value[2:])
    elif abi_type == "bytes32":
        ok = isinstance(value, bytes) and len(value) == 32
    else:  # uintN
        ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << int(abi_type[4:])
    if not ok:
        raise BadRequest(f"{name} is not a valid {abi_type}", field=name, value=repr(value)[:100])


def check_fields(fields: Fields, values: tuple[Any, ...]) -> None:
    """BadRequest naming the first field its abi type cannot hold."""
    for (name, abi_type), value in zip(fields, values, strict=True):
        _check(name, abi_type, value)


@dataclass(frozen=True)
class ReceiptRead:
    """A payer's request to read the text of one of its receipts (GET /v1/receipts/{id})."""

    receipt_id: bytes  # the receipt's EIP-712 digest
    payer: str
    deadline: int  # unix seconds; the node accepts only a short validity

    def __post_init__(self) -> None:
        check_fields(RECEIPT_READ_FIELDS, (self.receipt_id, self.payer, self.deadline))


def _word(abi_type: str, value: bytes | str | int) -> bytes:
    """`abi.encode` of one static value (already checked by `_check`): one 32-byte word."""
    if abi_type == "bytes32" and isinstance(value, bytes):
        return value
    if abi_type == "address" and isinstance(value, str):
        return bytes(12) + bytes.fromhex(value[2:])
    if abi_type.startswith("uint") and isinstance(value, int):
        return value.to_bytes(32, "big")
    raise TypeError(f"a {type(value).__name__} is no {abi_type}")  # a value `_check` never saw


def struct_hash(typehash: bytes, fields: Fields, values: tuple[Any, ...]) -> bytes:
    """keccak256(typehash || abi.encode(values)): the EIP-712 hashStruct of a struct of static fields."""
    return keccak(b"".join([typehash, *(_word(t, v) for (_, t), v in zip(fields, values, strict=True))]))


def digest(domain: Domain, hashed: bytes) -> bytes:
    """The EIP-712 digest of a struct hash under `domain`: what is signed."""
    return keccak(b"\x19\x01" + domain.separator() + hashed)


def typed_data(primary: str, fields: Fields, values: tuple[Any, ...], domain: Domain) -> dict[str, Any]:
    """The struct as a wallet-ready EIP-712 JSON dict (eth_signTypedData_v4)."""
    def jsonable(v: Any) -> Any:
        return to_hex(v) if isinstance(v, bytes) else v

    return {
        "types": {"EIP712Domain": [{"name": n, "type": t} for n, t in DOMAIN_FIELDS],
                  primary: [{"name": n, "type": t} for n, t in fields]},
        "primaryType": primary,
        "domain": {"name": domain.name, "version": domain.version, "chainId": domain.chain_id,
                   "verifyingContract": domain.verifying_contract},
        "message": {n: jsonable(v) for (n, _), v in zip(fields, values, strict=True)},
    }


@functools.lru_cache(maxsize=16)
def _private_key(key: str | bytes) -> PrivateKey:
    return PrivateKey(bytes.fromhex(key.removeprefix("0x")) if isinstance(key, str) else key)


def sign_digest(key: str | bytes, digest: bytes) -> bytes:
    """RFC 6979 deterministic, low-s (libsecp256k1 normalises s), as r||s||v with v = 27 + recovery id."""
    sig = _private_key(key).sign_recoverable(digest, hasher=None)  # r || s || recovery id
    return sig[:64] + bytes([sig[64] + 27])


def recover(digest: bytes, signature: bytes) -> str:
    """The checksummed signer of `digest`; BadSignature unless it is a canonical 65-byte signature."""
    if len(signature) != 65:
        raise BadSignature("signature must be 65 bytes r||s||v", length=len(signature))
    r, s, v = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:64], "big"), signature[64]
    if v not in (27, 28) or not 0 < r < SECP256K1_N or not 0 < s <= SECP256K1_N // 2:
        raise BadSignature("non-canonical signature (v must be 27/28, s in the lower half order)", v=v)
    try:
        public = PublicKey.from_signature_and_message(signature[:64] + bytes([v - 27]), digest, hasher=None)
    except ValueError as exc:  # libsecp256k1 found no point for this (r, s, v)
        raise BadSignature("signature does not recover", reason=str(exc)) from exc
    return checksum_from_bytes(keccak(public.format(compressed=False)[1:])[-20:])


# --- ReceiptRead ---------------------------------------------------------------------------------
def _read_values(r: ReceiptRead) -> tuple[Any, ...]:
    return (r.receipt_id, r.payer, r.deadline)


def receipt_read_typed_data(read: ReceiptRead, domain: Domain) -> dict[str, Any]:
    return typed_data("ReceiptRead", RECEIPT_READ_FIELDS, _read_values(read), domain)


def receipt_read_digest(read: ReceiptRead, domain: Domain) -> bytes:
    return digest(domain, struct_hash(RECEIPT_READ_TYPEHASH, RECEIPT_READ_FIELDS, _read_values(read)))


def sign_receipt_read(key: str | bytes, read: ReceiptRead, domain: Domain) -> bytes:
    return sign_digest(key, receipt_read_digest(read, domain))


def recover_receipt_read_signer(read: ReceiptRead, domain: Domain, signature: bytes) -> str:
    return recover(receipt_read_digest(read, domain), signature)
