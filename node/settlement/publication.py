"""What is public: a settled epoch's trees as JSON (the API serves it, `export_epoch` writes it to
a file), one receipt's proof in the epoch's receipts tree, and a receipt as anyone may see it.

An epoch is published once its `settle` is mined (CONFIRMED or FINAL), and while the chain holds its
tree: a tree the chain does not hold yet, or no longer holds (a guardian's amend forgot or replaced it,
node/settlement/overrule.py), would only mislead a claimant or a receipt's verifier. Everything here
carries hashes, token counts, offsets and weights only, never a payer's prompt or output text (nor
method 2's span texts, which are output text): those go to the payer alone, through `payer_view` behind a signed read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from node.db.models import EpochState, Receipt, SettlementEpoch, Voucher
from node.protocol.hexstr import from_hex, to_hex
from node.protocol.receipt import SignedReceipt, receipt_of_row, response_output_text
from node.settlement.merkle import MerkleTree, leaf_hash
from node.settlement.overrule import stale_epochs

PUBLISHED = (EpochState.CONFIRMED, EpochState.FINAL)


def epoch_document(row: SettlementEpoch) -> dict[str, Any]:
    assert row.trees is not None
    return {"node": row.node, "epochId": row.epoch_id, "state": row.state.value,
            "rewardsRoot": row.rewards_root, "rewardsTotal": str(row.rewards_total),
            "receiptsRoot": row.receipts_root, "receiptCount": row.receipt_count,
            "collected": str(row.collected_total), "txHash": row.tx_hash,
            "rewards": row.trees["rewards"], "receipts": row.trees["receipts"]}


def published_epoch(session: Session, node: str, epoch_id: int | None = None) -> SettlementEpoch | None:
    """Epoch `epoch_id` of `node` (the latest published one when None), if published."""
    q = select(SettlementEpoch).where(SettlementEpoch.node == node.lower(), SettlementEpoch.state.in_(PUBLISHED))
    if epoch_id is not None:
        q = q.where(SettlementEpoch.epoch_id == epoch_id)
    stale = stale_epochs(session, node)
    if stale:
        q = q.where(SettlementEpoch.epoch_id.not_in(stale))
    return session.scalars(q.order_by(SettlementEpoch.epoch_id.desc()).limit(1)).first()


def tree_of(dump: dict[str, Any]) -> MerkleTree:
    """A published tree as a MerkleTree, without re-hashing it (callers check the root on chain)."""
    return MerkleTree(tuple(dump["leafEncoding"]), tuple(tuple(v["value"]) for v in dump["values"]),
                      tuple(from_hex(h) for h in dump["tree"]),
                      tuple(int(v["treeIndex"]) for v in dump["values"]))


def receipt_proof(session: Session, receipt_hash: str) -> dict[str, Any] | None:
    """The receipt's epoch, its leaf and its proof in the receipts tree; None if unknown or unsettled."""
    receipt = session.scalars(select(Receipt).where(Receipt.receipt_hash == receipt_hash.lower())).first()
    if receipt is None or receipt.epoch_id is None:
        return None
    row = published_epoch(session, receipt.node, receipt.epoch_id)
    if row is None or row.trees is None:
        return None
    index = int(session.scalar(select(func.count()).where(Receipt.node == receipt.node,
                                                         Receipt.epoch_id == receipt.epoch_id,
                                                         Receipt.id < receipt.id)) or 0)
    tree = tree_of(row.trees["receipts"])
    leaf = leaf_hash(tree.types, receipt_of_row(receipt).leaf())
    if index >= len(tree) or tree.leaf(index) != leaf:  # an amended epoch: the guardian's tree, in its order
        index = next((i for i in range(len(tree)) if tree.leaf(i) == leaf), -1)
        if index < 0:
            return None  # folded into an amended epoch whose receipts tree does not hold it
    return {"receiptId": receipt.receipt_hash, "node": row.node, "epochId": row.epoch_id,
            "receiptsRoot": row.receipts_root, "leafEncoding": list(tree.types),
            "leaf": list(tree.values[index]), "leafHash": "0x" + tree.leaf(index).hex(),
            "proof": [to_hex(p) for p in tree.proof(index)]}


def receipt_with_payer(session: Session, receipt_hash: str) -> tuple[Receipt, Voucher] | None:
    """The receipt and the voucher that paid for it; None if unknown."""
    q = select(Receipt, Voucher).join(Voucher, Voucher.voucher_hash == Receipt.voucher_hash)
    found = session.execute(q.where(Receipt.receipt_hash == receipt_hash.lower())).first()
    return None if found is None else (found[0], found[1])


def receipt_document(row: Receipt, node: str) -> dict[str, Any]:
    """A receipt as anyone may see it: its signed fields and signature, its epoch, and its attribution
    with the spans' offsets and counts but not their text."""
    return {**SignedReceipt.from_row(row, node).to_json(), "createdAt": row.created_at.isoformat(),
            "epochId": row.epoch_id, "attribution": public_attribution(row.attribution)}


PUBLIC_ATTRIBUTION = ("rule", "minSpan", "alphaBps", "tokenizer", "datasetIds", "lineageBps", "weightsBps")


def public_attribution(attribution: dict[str, Any] | None) -> dict[str, Any] | None:
    """Method 2's attribution as anyone sees it: the rule and the weights its lineageHash commits to.
    The evidence stays the payer's: the span texts are pieces of the output, and even the span
    offsets, counts and the output's length would let a stranger rebuild a copied answer from the
    public datasets (hash each window of a dataset against the public outputHash)."""
    if attribution is None:
        return None
    return {k: attribution[k] for k in PUBLIC_ATTRIBUTION if k in attribution}


def payer_view(row: Receipt, voucher: Voucher) -> dict[str, Any]:
    """What only the payer may read: the full attribution, the lane and, while the node keeps the
    response (its idempotency window), the lane's charged total and the output text."""
    view: dict[str, Any] = {"attribution": row.attribution, "payer": voucher.payer, "lane": voucher.lane}
    if voucher.response is not None:
        view["chargedTotal"] = voucher.response["receipt"]["chargedTotal"]
        view["output"] = response_output_text(voucher.response)
    return view


def export_epoch(factory: sessionmaker[Session], node: str, path: Path, epoch_id: int | None = None) -> Path:
    """Write the published epoch (the latest when None) as JSON, the file `claim` accepts."""
    with factory() as session:
        row = published_epoch(session, node, epoch_id)
        if row is None:
            raise LookupError(f"no published epoch {epoch_id or 'yet'} for node {node}")
        doc = epoch_document(row)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path
