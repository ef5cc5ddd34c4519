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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from node.db.models import EpochState, Receipt, SettlementEpoch, Voucher
from node.protocol.hexstr import to_hex
from node.protocol.receipt import LEAF_TYPES, SignedReceipt, receipt_of_row, response_output_text
from node.settlement.merkle import leaf_hash
from node.settlement.overrule import stale_epochs
from node.settlement.published_trees import WITHOUT_TREES, ParsedTrees

PUBLISHED = (EpochState.CONFIRMED, EpochState.FINAL)


def epoch_head(row: SettlementEpoch) -> dict[str, Any]:
    """The epoch document less its trees."""
    return {"node": row.node, "epochId": row.epoch_id, "state": row.state.value,
            "rewardsRoot": row.rewards_root, "rewardsTotal": str(row.rewards_total),
            "receiptsRoot": row.receipts_root, "receiptCount": row.receipt_count,
            "collected": str(row.collected_total), "txHash": row.tx_hash}


def epoch_document(row: SettlementEpoch) -> dict[str, Any]:
    assert row.trees is not None
    return {**epoch_head(row), "rewards": row.trees["rewards"], "receipts": row.trees["receipts"]}


def epoch_json(row: SettlementEpoch, trees: ParsedTrees) -> bytes:
    """`epoch_document` as JSON, its trees spliced in as they were encoded once."""
    return json.dumps(epoch_head(row), separators=(",", ":")).encode()[:-1] + b"," + trees.encoded + b"}"


def published_epoch(session: Session, node: str, epoch_id: int | None = None, *,
                    with_trees: bool = True) -> SettlementEpoch | None:
    """Epoch `epoch_id` of `node` (the latest published one when None), if published; without its trees
    and batch unless `with_trees` (PublishedTrees reads them)."""
    q = select(SettlementEpoch).where(SettlementEpoch.node == node.lower(), SettlementEpoch.state.in_(PUBLISHED))
    if epoch_id is not None:
        q = q.where(SettlementEpoch.epoch_id == epoch_id)
    if not with_trees:
        q = q.options(*WITHOUT_TREES)
    stale = stale_epochs(session, node)
    if stale:
        q = q.where(SettlementEpoch.epoch_id.not_in(stale))
    return session.scalars(q.order_by(SettlementEpoch.epoch_id.desc()).limit(1)).first()


@dataclass(frozen=True)
class SettledReceipt:
    """A settled receipt's leaf, where it should sit in its epoch's receipts tree, and that epoch."""

    receipt_hash: str
    leaf: bytes
    index: int  # its position among the epoch's receipts (an amended epoch's tree may order them otherwise)
    epoch: SettlementEpoch  # without its trees


def settled_receipt(session: Session, receipt_hash: str) -> SettledReceipt | None:
    """The receipt, if it is in a published epoch; None if unknown or unsettled."""
    receipt = session.scalars(select(Receipt).where(Receipt.receipt_hash == receipt_hash.lower())).first()
    if receipt is None or receipt.epoch_id is None:
        return None
    row = published_epoch(session, receipt.node, receipt.epoch_id, with_trees=False)
    if row is None:
        return None
    index = int(session.scalar(select(func.count()).where(Receipt.node == receipt.node,
                                                         Receipt.epoch_id == receipt.epoch_id,
                                                         Receipt.id < receipt.id)) or 0)
    return SettledReceipt(receipt.receipt_hash, leaf_hash(LEAF_TYPES, receipt_of_row(receipt).leaf()), index, row)


def receipt_proof(session: Session, receipt_hash: str) -> dict[str, Any] | None:
    """The receipt's epoch, its leaf and its proof in the receipts tree, its trees read and parsed now (the
    API keeps them parsed, PublishedTrees); None if unknown, unsettled or not in the tree."""
    found = settled_receipt(session, receipt_hash)
    if found is None:
        return None
    trees = session.scalar(select(SettlementEpoch.trees).where(SettlementEpoch.id == found.epoch.id))
    return None if trees is None else proof_in(found, ParsedTrees.of(trees))


def proof_in(found: SettledReceipt, trees: ParsedTrees) -> dict[str, Any] | None:
    """The receipt's epoch, its leaf and its proof in the receipts tree; None if the tree does not hold it
    (folded into an amended epoch whose receipts tree does not hold it)."""
    tree = trees.receipts
    index = found.index
    if index >= len(tree) or tree.leaf(index) != found.leaf:  # an amended epoch: the guardian's tree, in its order
        index = trees.positions.get(found.leaf, -1)
        if index < 0:
            return None
    row = found.epoch
    return {"receiptId": found.receipt_hash, "node": row.node, "epochId": row.epoch_id,
            "receiptsRoot": row.receipts_root, "leafEncoding": list(tree.types),
            "leaf": list(tree.values[index]), "leafHash": "0x" + tree.leaf(index).hex(),
            "proof": [to_hex(p) for p in tree.proof(index)]}


def receipt_with_payer(session: Session, receipt_hash: str) -> tuple[Receipt, Voucher] | None:
    """The receipt and the voucher that paid for it; None if unknown."""
    q = select(Receipt, Voucher).join(Voucher, Voucher.voucher_hash == Receipt.voucher_hash)
    found = session.execute(q.where(Receipt.receipt_hash == receipt_hash.lower())).first()
    return None if found is None else (found[0], found[1])


def lane_receipts(session: Session, payer: str, node: str, lane: int, limit: int,
                  before: int | None = None) -> list[tuple[Receipt, Voucher]]:
    """The receipts of `payer`'s lane at `node`, newest first, each with its voucher; `before`: only
    those older than the receipt with that row id (a page's cursor)."""
    q = (select(Receipt, Voucher).join(Voucher, Voucher.voucher_hash == Receipt.voucher_hash)
         .where(Voucher.payer == payer, Voucher.node == node, Voucher.lane == lane))
    if before is not None:
        q = q.where(Receipt.id < before)
    return [(r, v) for r, v in session.execute(q.order_by(Receipt.id.desc()).limit(limit))]


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
