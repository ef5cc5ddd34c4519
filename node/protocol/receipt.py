"""The node's Receipt, in every form it takes: one home for its fields, hashes and encodings.

    Receipt                   the EIP-712 struct (bytes32 as bytes, integers as int), checked on creation
    receipt_digest / sign_receipt / recover_receipt_signer / receipt_typed_data   its EIP-712 hashing
    Receipt.leaf()            its receipts-tree leaf (LEAF_TYPES): what the settlement worker builds the tree
                              of, what the tests hold against @openzeppelin/merkle-tree and the contract
    SignedReceipt             a receipt with its id (= its digest), the node's signature and, for method 2,
                              the attribution its lineageHash commits to
    SignedReceipt.to_json()   the public JSON form (hashes 0x-hex, `fee` a decimal string), the base of the
                              response's `receipt` field (`response_json`) and of GET /v1/receipts/{id}
    SignedReceipt.from_json() / from_row(), receipt_of_row()    parse it from a response or a `receipts` row
    SignedReceipt.columns()   the `receipts` row it is stored as
    output_text() / response_output_text()   the text its outputHash covers (one answer, or n choices)
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from node.errors import BadRequest
from node.protocol.eip712 import Domain, Fields, check_fields, digest, recover, sign_digest, struct_hash, type_hash
from node.protocol.eip712 import typed_data as _typed_data
from node.protocol.hexstr import from_hex, parse_bytes, parse_hash, to_hex

RECEIPT_FIELDS: Fields = (("voucherHash", "bytes32"), ("adapterId", "bytes32"), ("registryBlock", "uint64"),
                          ("lineageHash", "bytes32"), ("promptTokens", "uint32"), ("completionTokens", "uint32"),
                          ("fee", "uint256"), ("outputHash", "bytes32"), ("method", "uint32"))
RECEIPT_TYPEHASH = type_hash("Receipt", RECEIPT_FIELDS)
# The abi types of one receipts-tree leaf: the Receipt's fields in type order (`Receipt.leaf()`).
LEAF_TYPES: tuple[str, ...] = tuple(t for _, t in RECEIPT_FIELDS)
# What a method 2 receipt's response says of the weights its lineageHash commits to.
ATTRIBUTION_SUMMARY_KEYS = ("rule", "minSpan", "alphaBps", "tokenizer", "datasetIds", "lineageBps", "weightsBps")


@dataclass(frozen=True)
class Receipt:
    voucher_hash: bytes  # voucher_digest of the voucher that paid
    adapter_id: bytes  # bytes32(uint256(adapterId))
    registry_block: int
    lineage_hash: bytes
    prompt_tokens: int
    completion_tokens: int
    fee: int
    output_hash: bytes
    method: int

    def __post_init__(self) -> None:
        check_fields(RECEIPT_FIELDS, self.values())

    def values(self) -> tuple[Any, ...]:
        """The fields in EIP-712 type order (RECEIPT_FIELDS)."""
        return (self.voucher_hash, self.adapter_id, self.registry_block, self.lineage_hash, self.prompt_tokens,
                self.completion_tokens, self.fee, self.output_hash, self.method)

    @property
    def adapter_number(self) -> int:
        """The registry's adapter id (the struct holds it as bytes32)."""
        return int.from_bytes(self.adapter_id, "big")

    def leaf(self) -> list[Any]:
        """The receipts-tree leaf: the fields in LEAF_TYPES order, bytes32 as 0x-hex (the published
        tree's JSON form; the tree hashes `abi.encode(LEAF_TYPES, leaf)` the OpenZeppelin way)."""
        return [to_hex(v) if isinstance(v, bytes) else v for v in self.values()]


# The adapterId of a receipt for the base model itself: no adapter (registry ids start at 1), so no owner
# share and no datasets; its lineageHash is the empty lineage's (node.chain.contracts.EMPTY_LINEAGE_HASH).
BASE_ADAPTER_ID = 0


def adapter_id_bytes(adapter_id: int) -> bytes:
    """The Receipt type's `adapterId`: bytes32(uint256(adapterId))."""
    return adapter_id.to_bytes(32, "big")


def receipt_typed_data(receipt: Receipt, domain: Domain) -> dict[str, Any]:
    return _typed_data("Receipt", RECEIPT_FIELDS, receipt.values(), domain)


def receipt_digest(receipt: Receipt, domain: Domain) -> bytes:
    """The 32 bytes the node signs; also the receipt's id."""
    return digest(domain, struct_hash(RECEIPT_TYPEHASH, RECEIPT_FIELDS, receipt.values()))


def sign_receipt(key: str | bytes, receipt: Receipt, domain: Domain) -> bytes:
    return sign_digest(key, receipt_digest(receipt, domain))


def recover_receipt_signer(receipt: Receipt, domain: Domain, signature: bytes) -> str:
    return recover(receipt_digest(receipt, domain), signature)


class ReceiptColumns(Protocol):
    """The columns of a stored receipt (`node.db.models.Receipt`) that hold its signed fields."""

    receipt_hash: str
    voucher_hash: str
    adapter_id: int
    registry_block: int
    lineage_hash: str
    prompt_tokens: int
    completion_tokens: int
    fee: int
    output_hash: str
    method: int
    signature: str
    attribution: dict[str, Any] | None


@dataclass(frozen=True)
class SignedReceipt:
    """A receipt as the node issued it: its id (its EIP-712 digest), signature and signer."""

    receipt: Receipt
    receipt_id: bytes
    signature: bytes
    node: str  # the signer's address
    attribution: dict[str, Any] | None = field(default=None, kw_only=True)  # method 2's evidence and weights

    @classmethod
    def sign(cls, receipt: Receipt, key: str | bytes, node: str, domain: Domain,
             attribution: dict[str, Any] | None = None) -> SignedReceipt:
        """Hash once (the id and what is signed), sign with the node's key."""
        receipt_id = receipt_digest(receipt, domain)
        return cls(receipt, receipt_id, sign_digest(key, receipt_id), node, attribution=attribution)

    @property
    def id_hex(self) -> str:
        return to_hex(self.receipt_id)

    def to_json(self) -> dict[str, Any]:
        """The signed fields (hashes 0x-hex, `fee` a decimal string), id, signature and node."""
        r = self.receipt
        return {"id": self.id_hex, "voucherHash": to_hex(r.voucher_hash), "adapterId": to_hex(r.adapter_id),
                "registryBlock": r.registry_block, "lineageHash": to_hex(r.lineage_hash),
                "promptTokens": r.prompt_tokens, "completionTokens": r.completion_tokens, "fee": str(r.fee),
                "outputHash": to_hex(r.output_hash), "method": r.method, "signature": to_hex(self.signature),
                "node": self.node}

    def response_json(self, charged_total: int) -> dict[str, Any]:
        """The `receipt` field of a paid response: `to_json()`, the lane's new charged total and, for
        method 2, which weights its lineageHash commits to (GET /v1/receipts/{id} serves the evidence)."""
        return {**self.to_json(), "chargedTotal": str(charged_total), **attribution_summary(self.attribution)}

    def columns(self) -> dict[str, Any]:
        """The `receipts` row's own columns (the ledger adds voucher, node and time)."""
        r = self.receipt
        return {"receipt_hash": self.id_hex, "adapter_id": r.adapter_number, "registry_block": r.registry_block,
                "lineage_hash": to_hex(r.lineage_hash), "prompt_tokens": r.prompt_tokens,
                "completion_tokens": r.completion_tokens, "fee": r.fee, "output_hash": to_hex(r.output_hash),
                "method": r.method, "signature": to_hex(self.signature), "attribution": self.attribution}

    @classmethod
    def from_row(cls, row: ReceiptColumns, node: str) -> SignedReceipt:
        """A stored receipt (`receipts` row) of `node`."""
        return cls(receipt_of_row(row), parse_hash(row.receipt_hash, "id"), parse_bytes(row.signature, "signature", 65),
                   node, attribution=row.attribution)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SignedReceipt:
        """A receipt as a response or GET /v1/receipts/{id} gives it; BadRequest naming what is wrong.
        (Its id and signer are as stated: check them with `recover_receipt_signer`.)"""
        try:
            receipt = Receipt(voucher_hash=parse_hash(data["voucherHash"], "voucherHash"),
                              adapter_id=parse_hash(data["adapterId"], "adapterId"),
                              registry_block=int(data["registryBlock"]),
                              lineage_hash=parse_hash(data["lineageHash"], "lineageHash"),
                              prompt_tokens=int(data["promptTokens"]),
                              completion_tokens=int(data["completionTokens"]), fee=int(data["fee"]),
                              output_hash=parse_hash(data["outputHash"], "outputHash"), method=int(data["method"]))
            signature = from_hex(data["signature"])  # its length is `recover`'s to refuse
        except (KeyError, TypeError, ValueError) as exc:
            raise BadRequest("the receipt lacks an EIP-712 field", reason=repr(exc)[:200]) from exc
        receipt_id = parse_hash(data["id"], "id") if "id" in data else bytes(32)
        return cls(receipt, receipt_id, signature, str(data.get("node", "")), attribution=data.get("attribution"))


def receipt_of_row(row: ReceiptColumns) -> Receipt:
    """The signed fields of a stored receipt (`receipts` row)."""
    return Receipt(parse_hash(row.voucher_hash, "voucherHash"), adapter_id_bytes(row.adapter_id), row.registry_block,
                   parse_hash(row.lineage_hash, "lineageHash"), row.prompt_tokens, row.completion_tokens,
                   int(row.fee), parse_hash(row.output_hash, "outputHash"), row.method)


def attribution_summary(attribution: dict[str, Any] | None) -> dict[str, Any]:
    """A method 2 receipt also says which weights its lineageHash commits to."""
    if attribution is None:
        return {}
    return {"attribution": {k: attribution[k] for k in ATTRIBUTION_SUMMARY_KEYS}}


def output_text(texts: Sequence[str]) -> str:
    """The text a receipt's outputHash (and its attribution) covers: the answer's text, or for a request
    of n > 1 choices the compact JSON array of their texts in choice order."""
    return texts[0] if len(texts) == 1 else json.dumps(list(texts), separators=(",", ":"), ensure_ascii=False)


def response_output_text(response: Mapping[str, Any]) -> str | None:
    """`output_text` of an OpenAI response body (chat or completion); None if a choice has no text."""
    texts = []
    for choice in response.get("choices") or []:
        text = choice.get("message", {}).get("content") if "message" in choice else choice.get("text")
        if not isinstance(text, str):
            return None
        texts.append(text)
    return output_text(texts) if texts else None
