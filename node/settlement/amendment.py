"""A guardian's veto and amend, and the node following it (contracts/src/Settlement.sol, `veto`/`amend`).

The guardian vetoes a locked epoch of a node; `amend` then replaces the node's first vetoed epoch with a
corrected rewards root over everything the pot ever collected, forgets every later epoch and lets the node
settle again from the amended id + 1. The amend carries the root only: the corrected tree is a file, a
rewards tree in OpenZeppelin's `standard-v1` dump (an exported epoch's `rewards`, corrected), and
optionally a `receipts` tree over the receipts of the vetoed and forgotten epochs (else the vetoed epoch's
receipts root is kept), which the guardian sends with (`amend`) and the node's operator adopts
(`adopt_amendment`):

- the tree is rebuilt from its leaves (its stored hashes are never trusted), its root must be the chain's
  for the amended epoch and its leaves must add up to the pot's whole `rewardsTotal`; `amend` also
  refuses a leaf below what its account already claimed, or a claimer left out (`check_claims_kept`);
- the amended epoch's row takes the corrected tree and roots: the API publishes it, `epoch export` writes
  it, `claim` proves against it, and the node's next epoch adds its shares to these cumulative leaves;
- each forgotten epoch the chain had settled (its roots still in the contract's storage) is folded into
  the amended one: its receipts were collected and are paid by the corrected leaves, so no later epoch
  collects them again; an epoch that never landed is dissolved (its receipts wait for the next epoch).

Until the tree is adopted the worker builds nothing on the vetoed leaves (`check_follows_chain`).
"""

from __future__ import annotations

import logging
from typing import Any

from eth_utils import to_checksum_address
from sqlalchemy import delete, update
from sqlalchemy.orm import Session, sessionmaker

from node.chain.contracts import Settlement
from node.chain.tx_store import db_lock
from node.db.models import EpochState, Loss, Receipt, SettlementEpoch
from node.errors import ChainError, ChainOverruled
from node.protocol.hexstr import to_hex
from node.protocol.receipt import LEAF_TYPES
from node.settlement import outbox
from node.settlement.epoch_builder import REWARD_LEAF_TYPES
from node.settlement.merkle import MerkleTree

log = logging.getLogger(__name__)
MINED = (EpochState.CONFIRMED, EpochState.FINAL)
ADOPT_HINT = "adopt the guardian's corrected tree: `loranode settle adopt --tree FILE`"


def corrected_tree(doc: dict[str, Any]) -> MerkleTree:
    """The rewards tree of a corrected-tree file (`{"rewards": <standard-v1 dump>}`), rebuilt from its
    leaves; every leaf an (address, amount) with each address once."""
    try:
        dump = doc["rewards"]
        if list(dump["leafEncoding"]) != list(REWARD_LEAF_TYPES):
            raise ChainError("the corrected tree's leaves are not (address, uint256)", encoding=dump["leafEncoding"])
        leaves = [(str(v["value"][0]), int(v["value"][1])) for v in dump["values"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise ChainError("not a corrected rewards tree: expected {\"rewards\": a standard-v1 dump}",
                         error=type(exc).__name__) from exc
    accounts = [a.lower() for a, _ in leaves]
    if not leaves or len(set(accounts)) != len(accounts) or any(v < 0 for _, v in leaves):
        raise ChainError("a corrected tree needs leaves, each account once, no negative amount",
                         num_leaves=len(leaves))
    return MerkleTree.of(leaves, REWARD_LEAF_TYPES)


def corrected_receipts(doc: dict[str, Any]) -> MerkleTree | None:
    """The file's receipts tree (every hash checked), None when it has none (the amend then keeps the
    vetoed epoch's receipts root)."""
    if doc.get("receipts") is None:
        return None
    try:
        tree = MerkleTree.load(doc["receipts"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ChainError("the corrected receipts tree is not a valid standard-v1 dump", error=str(exc)) from exc
    if tree.types != tuple(LEAF_TYPES):
        raise ChainError("the corrected receipts tree's leaves are not receipts", encoding=list(tree.types))
    return tree


def amended_epoch_document(node: str, epoch_id: int, doc: dict[str, Any]) -> dict[str, Any]:
    """The amended epoch as `export_epoch` writes one: what `claim --proofs FILE` and `settle adopt` read."""
    rewards, receipts = corrected_tree(doc), corrected_receipts(doc)
    return {"node": to_checksum_address(node), "epochId": epoch_id, "rewardsRoot": to_hex(rewards.root),
            "rewardsTotal": str(tree_total(rewards)), "rewards": rewards.to_json(),
            "receipts": None if receipts is None else receipts.to_json()}


def tree_total(tree: MerkleTree) -> int:
    return sum(int(v[1]) for v in tree.values)


def amend(settlement: Settlement, node: str, doc: dict[str, Any]) -> tuple[int, bytes]:
    """The guardian's amend of `node`'s first vetoed epoch with the tree of `doc` (the receipts root and
    count of the vetoed epoch are kept). Checked before any gas is spent; returns (epoch id, root)."""
    epoch_id = settlement.first_vetoed_epoch(node)
    if epoch_id == 0:
        raise ChainError("the node has no vetoed epoch: veto one first (`loranode settle veto`)", node=node)
    tree, pot = corrected_tree(doc), settlement.rewards_total(node)
    if tree_total(tree) != pot:
        raise ChainError("the corrected tree must pay out exactly the whole pot", node=node,
                         tree_total=str(tree_total(tree)), rewards_total=str(pot))
    check_claims_kept(settlement, node, tree)
    check_node_idle(settlement, node)
    receipts = corrected_receipts(doc)
    if receipts is None:
        vetoed = settlement.epoch(node, epoch_id)
        receipts_root, receipt_count = vetoed.receipts_root, vetoed.receipt_count
    else:
        receipts_root, receipt_count = receipts.root, len(receipts)
    settlement.amend(node, tree.root, pot, receipts_root, receipt_count)
    log.info("amended epoch %d of %s: root %s over %d", epoch_id, node, to_hex(tree.root), pot)
    return epoch_id, tree.root


def check_claims_kept(settlement: Settlement, node: str, tree: MerkleTree) -> None:
    """Refuse a corrected tree that gives an account less than it already claimed, or leaves out one
    that claimed: `claimed` survives the amend, so the pot would pay out more than the tree's total and
    the last payees to claim would be refused (`ExceedsEpochTotal`). Every account's claim is counted
    once the leaves' claims add up to all the pot has paid out."""
    claims, paid_out = settlement.claims_of(node, [str(account) for account, _ in tree.values])  # a few requests
    for (account, amount), claimed in zip(tree.values, claims, strict=True):
        if int(amount) < claimed:
            raise ChainError("the corrected tree pays an account less than it already claimed", node=node,
                             account=to_checksum_address(str(account)), leaf=str(amount), claimed=str(claimed))
    claimed_by_leaves = sum(claims)
    if paid_out != claimed_by_leaves:
        raise ChainError("an account that already claimed is missing from the corrected tree", node=node,
                         paid_out=str(paid_out), claimed_by_leaves=str(claimed_by_leaves))


def check_node_idle(settlement: Settlement, node: str) -> None:
    """Refuse to amend while the node has a transaction in the mempool: a settle it sent before the veto
    reverts while the node is vetoed, but the amend makes it valid again, and it would land as the next
    epoch with leaves built on the vetoed ones. The node's worker replaces such a settle with a no-op when
    it sees the veto (`TxManager.cancel`); the guardian amends once that is mined."""
    w3, who = settlement.client.w3, to_checksum_address(node)
    mined, pending = w3.eth.get_transaction_count(who, "latest"), w3.eth.get_transaction_count(who, "pending")
    if pending > mined:
        raise ChainError("the node has a transaction in the mempool that the amend could let land on the vetoed "
                         "leaves: amend once it is mined (the node's worker replaces a pending settle of a vetoed "
                         "node with a no-op; an operator without a worker runs `loranode worker` once)", node=who,
                         pending_nonces=f"{mined}..{pending - 1}")


def check_follows_chain(settlement: Settlement, node: str, previous: SettlementEpoch | None) -> None:
    """Refuse to build on `previous` (the epoch a new one's cumulative leaves start from) while the node is
    vetoed, or when the chain holds another root for it (the guardian amended it)."""
    vetoed = settlement.first_vetoed_epoch(node)
    if vetoed:
        raise ChainOverruled("the guardian vetoed this node: nothing is settled until it amends and the operator "
                             "adopts the corrected tree", node=node, vetoed_epoch=vetoed)
    if previous is None or previous.state not in MINED:
        return
    on_chain = to_hex(settlement.epoch(node, previous.epoch_id).rewards_root)
    if on_chain != previous.rewards_root:
        raise ChainOverruled(f"epoch {previous.epoch_id} was amended on chain: {ADOPT_HINT}", node=node,
                             epoch_id=previous.epoch_id, on_chain_root=on_chain, our_root=previous.rewards_root)


def follows_chain(settlement: Settlement, node: str, previous: SettlementEpoch | None) -> bool:
    """Whether an epoch built on `previous` may still land: False while the node is vetoed or once the
    chain holds another root for `previous` (a settle sent before the veto must then be cancelled, since
    the amend makes it valid again). A `previous` the chain holds no root for (a reorg took its block: its
    settle is re-sent first, on the same nonce order) is still followed."""
    try:
        check_follows_chain(settlement, node, previous)
    except ChainOverruled as exc:  # only the guardian's word: a failed read is no reason to cancel a good settle
        return exc.facts.get("on_chain_root") == to_hex(bytes(32))
    return True


def adopt_amendment(factory: sessionmaker[Session], settlement: Settlement, node: str, doc: dict[str, Any]) -> int:
    """Make the node's database follow the guardian's amend with its tree `doc`; returns the amended epoch
    id. Idempotent: a tree already adopted changes nothing."""
    if settlement.first_vetoed_epoch(node):
        raise ChainError("the node is still vetoed: the guardian has not amended yet", node=node)
    epoch_id, tree = settlement.last_epoch(node), corrected_tree(doc)
    info = settlement.epoch(node, epoch_id)
    if tree.root != info.rewards_root or tree_total(tree) != info.rewards_total:
        raise ChainError("this tree is not the one the chain holds for the node's latest epoch", node=node,
                         epoch_id=epoch_id, tree_root=to_hex(tree.root), on_chain_root=to_hex(info.rewards_root),
                         tree_total=str(tree_total(tree)), on_chain_total=str(info.rewards_total))
    with db_lock(factory.kw["bind"], f"epoch:{node.lower()}"), factory() as session, session.begin():  # the worker's
        row = outbox.epoch_row(session, node, epoch_id)
        if row is None or row.state not in (*MINED, EpochState.SUBMITTED):
            raise ChainError("this database never settled the amended epoch", node=node, epoch_id=epoch_id)
        if row.rewards_root == to_hex(tree.root):
            return epoch_id
        if row.state is EpochState.SUBMITTED:  # it landed (the chain amended it): mined
            row.state = EpochState.CONFIRMED
        folded = sum(_follow(session, settlement, node, epoch_id, later) for later in outbox.later(session, node,
                                                                                                   epoch_id))
        row.rewards_root, row.rewards_total = to_hex(tree.root), info.rewards_total
        row.receipts_root, row.receipt_count = to_hex(info.receipts_root), info.receipt_count
        row.collected_total = (row.collected_total or 0) + folded
        receipts = corrected_receipts(doc)
        if receipts is not None and receipts.root == info.receipts_root:
            row.trees = {**(row.trees or {}), "receipts": receipts.to_json()}
        row.trees = {**(row.trees or {}), "rewards": tree.to_json()}
    log.warning("epoch %d of %s follows the guardian's amend: root %s", epoch_id, node, to_hex(tree.root))
    return epoch_id


def _follow(session: Session, settlement: Settlement, node: str, epoch_id: int, later: SettlementEpoch) -> int:
    """Fold a forgotten epoch the chain had settled into `epoch_id` (its collected amount), or dissolve one
    that never landed (0)."""
    stored = settlement.epoch(node, later.epoch_id)  # a forgotten epoch's storage keeps its old roots
    landed = later.rewards_root is not None and to_hex(stored.rewards_root) == later.rewards_root \
        and to_hex(stored.receipts_root) == later.receipts_root
    if not landed:
        outbox.dissolve(session, node, later.epoch_id)
        return 0
    session.execute(update(Receipt).where(Receipt.node == node.lower(), Receipt.epoch_id == later.epoch_id)
                    .values(epoch_id=epoch_id).execution_options(synchronize_session=False))
    session.execute(update(Loss).where(Loss.node == node.lower(), Loss.recovered_epoch_id == later.epoch_id)
                    .values(recovered_epoch_id=epoch_id).execution_options(synchronize_session=False))
    session.execute(update(Loss).where(Loss.node == node.lower(), Loss.epoch_id == later.epoch_id)
                    .values(epoch_id=epoch_id).execution_options(synchronize_session=False))
    session.execute(delete(SettlementEpoch).where(SettlementEpoch.node == node.lower(),
                                                  SettlementEpoch.epoch_id == later.epoch_id))
    return int(later.collected_total or 0)
