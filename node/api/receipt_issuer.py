"""The node's receipt for a charge: the EIP-712 `Receipt` of what was served, its attribution and the
node's signature. The payment service decides the fee; the issuer turns (voucher, adapter, usage, fee,
output) into the `SignedReceipt` the ledger commits with that charge.

On a node with an `Attributor` (method 2) the output's evidence is computed here, and the receipt's
lineageHash commits to the blended weights (stored with the receipt); else to the adapter's lineage.
The base model alone has no lineage: its receipt names adapter 0 and the empty lineage, method 1.
"""

from __future__ import annotations

from eth_account import Account
from eth_hash.auto import keccak

from node.attribution.attributor import Attributor
from node.attribution.evidence import Attribution
from node.attribution.index_store import DatasetRef
from node.attribution.rule import METHOD_EVIDENCE, METHOD_LINEAGE
from node.catalog import ServedAdapter
from node.chain.contracts import EMPTY_LINEAGE_HASH
from node.db.queries import AdapterLineageView
from node.payment.service import Usage
from node.protocol.eip712 import Domain
from node.protocol.hexstr import from_hex
from node.protocol.receipt import Receipt, SignedReceipt, adapter_id_bytes


class ReceiptIssuer:
    def __init__(self, operator_key: str, domain: Domain, attributor: Attributor | None = None) -> None:
        self.operator_key = operator_key
        self.node = str(Account.from_key(operator_key).address)
        self.domain = domain
        self.attributor = attributor

    def issue(self, voucher_digest: bytes, adapter: ServedAdapter, usage: Usage, fee: int,
              output_text: str) -> SignedReceipt:
        """The signed receipt of `fee` for `usage` of `adapter`, paid by the voucher `voucher_digest`."""
        lineage = adapter.lineage
        attribution = None if lineage is None else self._attribute(lineage, output_text)
        if attribution is not None:
            committed = attribution.lineage_hash
        else:
            committed = EMPTY_LINEAGE_HASH if lineage is None else from_hex(lineage.lineage_hash)
        receipt = Receipt(voucher_hash=voucher_digest, adapter_id=adapter_id_bytes(adapter.adapter_id),
                          registry_block=adapter.registry_block, lineage_hash=committed,
                          prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens, fee=fee,
                          output_hash=keccak(output_text.encode()),
                          method=METHOD_LINEAGE if attribution is None else METHOD_EVIDENCE)
        return SignedReceipt.sign(receipt, self.operator_key, self.node, self.domain,
                                  None if attribution is None else attribution.to_json())

    def _attribute(self, lineage: AdapterLineageView, output_text: str) -> Attribution | None:
        """Method 2's attribution of the output; None on a method 1 node or while an index is building."""
        if self.attributor is None:
            return None
        return self.attributor.attribute(dataset_refs(lineage), [d.weight_bps for d in lineage.datasets],
                                         output_text)


def dataset_refs(lineage: AdapterLineageView) -> list[DatasetRef]:
    return [DatasetRef(d.dataset_id, d.content_hash, d.uri) for d in lineage.datasets]
