"""Did the node tell the truth? A receipt's attribution recomputed from the output text (checked
against outputHash; its payer's alone) and public data only: the registry (the adapter's lineage
hash, the datasets' URIs and content hashes) and the datasets themselves, fetched and checked
against those hashes.

    method 1  lineageHash must be the adapter's registered lineage hash (adapter 0, the base model
              alone: the empty lineage's)
    method 2  the stated lineage must be the registered one, the stated weights must hash to
              lineageHash, and the weights recomputed by the stated rule version must be those weights
Every receipt must also be signed by the node it names (EIP-712, the deployment's domain). The output
text is its payer's alone: anyone else checks everything but the outputHash and the recomputation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from eth_hash.auto import keccak

from node.attribution.evidence import StatedWeights, attribute, stated_weights
from node.attribution.index_store import DatasetRef, IndexStore
from node.attribution.rule import METHOD_EVIDENCE, METHOD_LINEAGE, rule_of
from node.chain.contracts import EMPTY_LINEAGE_HASH, lineage_hash
from node.errors import AttributionError, BadSignature
from node.protocol.eip712 import Domain
from node.protocol.hexstr import to_hex
from node.protocol.receipt import BASE_ADAPTER_ID, Receipt, SignedReceipt, recover_receipt_signer


class Registry(Protocol):
    """The registry reads a verifier needs (the chain, through the contract bindings)."""

    def adapter_lineage_hash(self, adapter_id: int) -> bytes: ...

    def dataset(self, dataset_id: int) -> DatasetRef: ...


@dataclass(frozen=True)
class Verdict:
    is_truthful: bool
    line: str


def verify(receipt: Mapping[str, Any], output_text: str | None, registry: Registry, store: IndexStore,
           domain: Domain) -> Verdict:
    """The whole check with the output text; without it (it is the payer's alone) everything that
    does not need it: the signature, the lineage, and method 2's stated weights against lineageHash."""
    stated_receipt = SignedReceipt.from_json(receipt)
    signed = stated_receipt.receipt
    rid = str(receipt.get("id", "?"))
    if output_text is not None and keccak(output_text.encode()) != signed.output_hash:
        return Verdict(False, f"MISMATCH receipt {rid}: the output text does not hash to its outputHash")
    try:
        signer = recover_receipt_signer(signed, domain, stated_receipt.signature)
    except BadSignature as exc:
        return Verdict(False, f"MISMATCH receipt {rid}: its signature is invalid ({exc.message})")
    if signer.lower() != str(receipt.get("node", "")).lower():
        return Verdict(False, f"MISMATCH receipt {rid}: signed by {signer}, not by the node {receipt.get('node')}")
    is_base = signed.adapter_number == BASE_ADAPTER_ID
    registered = EMPTY_LINEAGE_HASH if is_base else registry.adapter_lineage_hash(signed.adapter_number)
    if signed.method == METHOD_LINEAGE:
        return _verify_lineage(rid, signed, registered, is_text_checked=output_text is not None)
    if signed.method != METHOD_EVIDENCE:
        raise AttributionError(f"unknown attribution method {signed.method}", method=signed.method)
    stated = stated_weights(receipt.get("attribution"))
    lie = _stated_lie(rid, signed, stated, registered)
    if lie is not None:
        return lie
    if output_text is None:
        return Verdict(True, f"consistent: receipt {rid} (method 2, rule {stated.rule}) is signed by its node, its "
                             f"stated weights {list(stated.weights_bps)} hash to its lineageHash and its lineage is "
                             f"the registered one; {WITHOUT_TEXT}: the evidence was not recomputed")
    return _verify_evidence(rid, signed, stated, output_text, registry, store)


WITHOUT_TEXT = "without the output text (its payer's: --key-file or --output-file)"


def _verify_lineage(rid: str, signed: Receipt, registered: bytes, *, is_text_checked: bool) -> Verdict:
    if signed.lineage_hash != registered:
        return Verdict(False, f"MISMATCH receipt {rid} (method 1): lineageHash {to_hex(signed.lineage_hash)} is "
                              f"not the adapter's registered lineage {to_hex(registered)}")
    unchecked = "" if is_text_checked else f"; {WITHOUT_TEXT}: its outputHash was not checked"
    return Verdict(True, f"truthful: receipt {rid} (method 1) commits to the adapter's registered lineage{unchecked}")


def _stated_lie(rid: str, signed: Receipt, stated: StatedWeights, registered: bytes) -> Verdict | None:
    """A MISMATCH if the stated weights or lineage are not what the receipt and the registry say."""
    if stated.lineage_hash != signed.lineage_hash:
        return Verdict(False, f"MISMATCH receipt {rid} (method 2): the stated weights {list(stated.weights_bps)} hash "
                              f"to {to_hex(stated.lineage_hash)}, not to its lineageHash {to_hex(signed.lineage_hash)}")
    if lineage_hash(stated.dataset_ids, stated.lineage_bps) != registered:
        return Verdict(False, f"MISMATCH receipt {rid} (method 2): the stated lineage is not the adapter's "
                              f"registered one {to_hex(registered)}")
    return None


def _verify_evidence(rid: str, signed: Receipt, stated: StatedWeights, output_text: str, registry: Registry,
                     store: IndexStore) -> Verdict:
    """Recompute the evidence from the datasets and the output text; the weights must be the stated ones."""
    if stated.tokenizer != store.tokenizer_id:
        raise AttributionError("the verifier's tokenizer is not the one the evidence was computed with: pass the "
                               "node's base model folder", receipt=stated.tokenizer, verifier=store.tokenizer_id)
    indexes = {d: store.get(registry.dataset(d)) for d in dict.fromkeys(stated.dataset_ids)}
    again = attribute(output_text, stated.dataset_ids, stated.lineage_bps, indexes, store.tokenizer,
                      store.tokenizer_id, rule_of(stated.rule))
    if again.lineage_hash != signed.lineage_hash:
        return Verdict(False, f"MISMATCH receipt {rid} (method 2, rule {stated.rule}): recomputed weights "
                              f"{list(again.weights_bps)} hash to {to_hex(again.lineage_hash)}; the node signed "
                              f"{list(stated.weights_bps)} ({to_hex(signed.lineage_hash)})")
    scores = ", ".join(f"{e.dataset_id}:{e.score}" for e in again.evidence)
    return Verdict(True, f"truthful: receipt {rid} (method 2, rule {stated.rule}): weights "
                         f"{list(again.weights_bps)} recomputed from {len(indexes)} datasets (scores {scores}) "
                         f"match its lineageHash")
