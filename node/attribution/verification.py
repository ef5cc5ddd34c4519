"""Did the node tell the truth? A receipt's attribution recomputed from public data only: the output
text (checked against outputHash), the registry (the adapter's lineage hash, the datasets' URIs and
content hashes) and the datasets themselves, fetched and checked against those hashes.

    method 1  lineageHash must be the adapter's registered lineage hash
    method 2  the stated lineage must be the registered one, the stated weights must hash to
              lineageHash, and the weights recomputed by the stated rule version must be those weights
Every receipt must also be signed by the node it names (EIP-712, the deployment's domain).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from eth_hash.auto import keccak

from node.attribution.evidence import attribute, stated_weights
from node.attribution.index_store import DatasetRef, IndexStore
from node.attribution.rule import METHOD_EVIDENCE, METHOD_LINEAGE, rule_of
from node.chain.contracts import lineage_hash
from node.chain.eip712 import Domain, Receipt, recover_receipt_signer
from node.errors import AttributionError, BadRequest, BadSignature


class Registry(Protocol):
    """The registry reads a verifier needs (the chain, through the contract bindings)."""

    def adapter_lineage_hash(self, adapter_id: int) -> bytes: ...

    def dataset(self, dataset_id: int) -> DatasetRef: ...


@dataclass(frozen=True)
class Verdict:
    is_truthful: bool
    line: str


def _hex(value: bytes) -> str:
    return "0x" + value.hex()


def _b(receipt: Mapping[str, Any], name: str) -> bytes:
    try:
        return bytes.fromhex(str(receipt[name]).removeprefix("0x"))
    except (KeyError, ValueError) as exc:
        raise BadRequest(f"the receipt's {name} is missing or not hex", field=name) from exc


def signed_receipt(receipt: Mapping[str, Any]) -> Receipt:
    try:
        return Receipt(voucher_hash=_b(receipt, "voucherHash"), adapter_id=_b(receipt, "adapterId"),
                       registry_block=int(receipt["registryBlock"]), lineage_hash=_b(receipt, "lineageHash"),
                       prompt_tokens=int(receipt["promptTokens"]), completion_tokens=int(receipt["completionTokens"]),
                       fee=int(receipt["fee"]), output_hash=_b(receipt, "outputHash"), method=int(receipt["method"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise BadRequest("the receipt lacks an EIP-712 field", reason=repr(exc)[:200]) from exc


def verify(receipt: Mapping[str, Any], output_text: str, registry: Registry, store: IndexStore,
           domain: Domain) -> Verdict:
    signed = signed_receipt(receipt)
    rid = str(receipt.get("id", "?"))
    if keccak(output_text.encode()) != signed.output_hash:
        return Verdict(False, f"MISMATCH receipt {rid}: the output text does not hash to its outputHash")
    try:
        signer = recover_receipt_signer(signed, domain, _b(receipt, "signature"))
    except BadSignature as exc:
        return Verdict(False, f"MISMATCH receipt {rid}: its signature is invalid ({exc.message})")
    if signer.lower() != str(receipt.get("node", "")).lower():
        return Verdict(False, f"MISMATCH receipt {rid}: signed by {signer}, not by the node {receipt.get('node')}")
    registered = registry.adapter_lineage_hash(int.from_bytes(signed.adapter_id, "big"))
    if signed.method == METHOD_LINEAGE:
        if signed.lineage_hash != registered:
            return Verdict(False, f"MISMATCH receipt {rid} (method 1): lineageHash {_hex(signed.lineage_hash)} is "
                                  f"not the adapter's registered lineage {_hex(registered)}")
        return Verdict(True, f"truthful: receipt {rid} (method 1) commits to the adapter's registered lineage")
    if signed.method != METHOD_EVIDENCE:
        raise AttributionError(f"unknown attribution method {signed.method}", method=signed.method)
    return _verify_evidence(rid, signed, receipt.get("attribution"), output_text, registered, registry, store)


def _verify_evidence(rid: str, signed: Receipt, attribution: Any, output_text: str, registered: bytes,
                     registry: Registry, store: IndexStore) -> Verdict:
    stated = stated_weights(attribution)
    if stated.lineage_hash != signed.lineage_hash:
        return Verdict(False, f"MISMATCH receipt {rid} (method 2): the stated weights {list(stated.weights_bps)} hash "
                              f"to {_hex(stated.lineage_hash)}, not to its lineageHash {_hex(signed.lineage_hash)}")
    if lineage_hash(stated.dataset_ids, stated.lineage_bps) != registered:
        return Verdict(False, f"MISMATCH receipt {rid} (method 2): the stated lineage is not the adapter's "
                              f"registered one {_hex(registered)}")
    if stated.tokenizer != store.tokenizer_id:
        raise AttributionError("the verifier's tokenizer is not the one the evidence was computed with: pass the "
                               "node's base model folder", receipt=stated.tokenizer, verifier=store.tokenizer_id)
    indexes = {d: store.get(registry.dataset(d)) for d in dict.fromkeys(stated.dataset_ids)}
    again = attribute(output_text, stated.dataset_ids, stated.lineage_bps, indexes, store.tokenizer,
                      store.tokenizer_id, rule_of(stated.rule))
    if again.lineage_hash != signed.lineage_hash:
        return Verdict(False, f"MISMATCH receipt {rid} (method 2, rule {stated.rule}): recomputed weights "
                              f"{list(again.weights_bps)} hash to {_hex(again.lineage_hash)}; the node signed "
                              f"{list(stated.weights_bps)} ({_hex(signed.lineage_hash)})")
    scores = ", ".join(f"{e.dataset_id}:{e.score}" for e in again.evidence)
    return Verdict(True, f"truthful: receipt {rid} (method 2, rule {stated.rule}): weights "
                         f"{list(again.weights_bps)} recomputed from {len(indexes)} datasets (scores {scores}) "
                         f"match its lineageHash")
