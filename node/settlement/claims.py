"""Claiming rewards: for one payee (anyone may send it for them), or in bulk for relayers.

The proof comes from a published epoch: the node's API (`GET /v1/epochs/{node}/latest`, or the
newest one past its challenge period) or a JSON file written by `export_epoch`. The tree is never
trusted: its root must equal the root the chain holds for that epoch, each proof is checked against
it before sending, and the contract checks it again. Both functions return what was paid; an account
with nothing due is not sent a transaction (the contract would revert), and one that another claim paid
meanwhile (a third party's, ahead of ours) is paid: `claim` answers 0 rather than an error.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from eth_utils import to_checksum_address

from node.chain.contract_client import event_args
from node.chain.contracts import ClaimRequest, Contracts
from node.errors import ChainError, TxNotMined
from node.protocol.hexstr import to_hex
from node.settlement.merkle import MerkleTree
from node.settlement.published_trees import tree_of

log = logging.getLogger(__name__)
MAX_CLAIMS_PER_TX = 100


@dataclass(frozen=True)
class PublishedRewards:
    node: str
    epoch_id: int
    tree: MerkleTree

    def entry(self, account: str) -> tuple[int, list[bytes]] | None:
        """(cumulative amount, proof) of `account`, None if it is not a payee."""
        wanted = to_checksum_address(account)
        for i, value in enumerate(self.tree.values):
            if to_checksum_address(value[0]) == wanted:
                return self.at(i)
        return None

    def at(self, index: int) -> tuple[int, list[bytes]]:
        """Leaf `index`'s amount and proof, checked against the root (a bad tree costs no gas)."""
        value, proof = self.tree.values[index], self.tree.proof(index)
        if not MerkleTree.verify(self.tree.root, self.tree.types, value, proof):
            raise ChainError("a published proof does not verify", node=self.node, account=value[0])
        return int(value[1]), proof


def load_rewards(contracts: Contracts, node: str, proof_source: str | Path) -> PublishedRewards:
    """The newest claimable published epoch whose root is the one the chain holds: from an exported file,
    or from an API base URL walking back from `latest` past epochs still locked or vetoed, epochs the API
    does not publish (one the guardian amended, until the operator adopts its tree) and published trees
    the chain no longer holds (forgotten or replaced by an amend)."""
    doc: dict[str, Any] | None = _fetch(node, proof_source)
    assert doc is not None
    epoch_id = int(doc["epochId"])
    while True:
        problem = _unclaimable(contracts, node, epoch_id, doc)
        if problem is None:
            assert doc is not None
            return PublishedRewards(to_checksum_address(node), epoch_id, tree_of(doc["rewards"]))
        if not _is_url(proof_source) or epoch_id <= 1:
            raise problem
        epoch_id -= 1
        doc = _fetch(node, proof_source, epoch_id)


def _unclaimable(contracts: Contracts, node: str, epoch_id: int, doc: dict[str, Any] | None) -> ChainError | None:
    """Why `doc` (epoch `epoch_id` as published, None when it is not) cannot be claimed against now."""
    if doc is None:
        return ChainError("the node does not publish this epoch", node=node, epoch_id=epoch_id)
    if not contracts.settlement.is_claimable(node, epoch_id):
        return ChainError("the epoch is not claimable (still locked, or vetoed)", node=node, epoch_id=epoch_id)
    root, on_chain = tree_of(doc["rewards"]).root, contracts.settlement.epoch(node, epoch_id).rewards_root
    if root != on_chain:
        return ChainError("the published rewards tree does not match the chain", node=node, epoch_id=epoch_id,
                          published=to_hex(root), on_chain=to_hex(on_chain))
    return None


def _is_url(source: str | Path) -> bool:
    return isinstance(source, str) and source.startswith(("http://", "https://"))


def _fetch(node: str, source: str | Path, epoch_id: int | None = None) -> dict[str, Any] | None:
    """The published epoch (`latest` when no id), None when the API does not publish that id."""
    if _is_url(source):
        url = f"{str(source).rstrip('/')}/v1/epochs/{to_checksum_address(node)}/{epoch_id or 'latest'}"
        resp = httpx.get(url, timeout=60)
        if resp.status_code == 404 and epoch_id is not None:
            return None
        if resp.status_code != 200:
            raise ChainError("cannot fetch the published epoch", url=url, status=resp.status_code)
        return resp.json()  # type: ignore[no-any-return]
    doc: dict[str, Any] = json.loads(Path(source).read_text())
    if doc["node"].lower() != node.lower():
        raise ChainError("the export is for another node", node=node, export_node=doc["node"])
    return doc


def claim(contracts: Contracts, node: str, account: str, proof_source: str | Path) -> int:
    """Pay `account` everything due from `node`'s pot (sent by `contracts`' key); returns the amount."""
    rewards = load_rewards(contracts, node, proof_source)
    entry = rewards.entry(account)
    if entry is None:
        return 0
    cumulative, proof = entry
    if cumulative <= contracts.settlement.claimed(node, account):
        return 0
    try:
        receipt = contracts.settlement.claim(node, rewards.epoch_id, account, cumulative, proof)
    except ChainError:
        if cumulative <= contracts.settlement.claimed(node, account):  # anyone may claim for anyone: one did first
            log.info("%s was paid up to %d from node %s by another claim meanwhile", account, cumulative, node)
            return 0
        raise
    paid = sum(int(e["amount"]) for e in event_args(contracts.settlement.contract, receipt, "Claimed"))
    log.info("claimed %d for %s from node %s epoch %d", paid, account, node, rewards.epoch_id)
    return paid


@dataclass(frozen=True)
class BulkClaim:
    """What `claim_all` did: account -> amount paid, and account -> why the chain refused to pay it."""

    paid: dict[str, int] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)


def claim_all(contracts: Contracts, node: str, proof_source: str | Path,
              accounts: list[str] | None = None) -> BulkClaim:
    """claimMany for every payee with something due (or only `accounts`). A payee the chain refuses to
    pay (its token transfer reverts: a blocklisted address) is found by simulating the batch in halves,
    reported in `refused` and left out, so it never stops the others being paid."""
    rewards = load_rewards(contracts, node, proof_source)
    wanted = None if accounts is None else {to_checksum_address(a) for a in accounts}
    picked = [(i, to_checksum_address(v[0])) for i, v in enumerate(rewards.tree.values)
              if wanted is None or to_checksum_address(v[0]) in wanted]
    claimed, _ = contracts.settlement.claims_of(node, [account for _, account in picked])  # a few requests
    requests = []
    for (i, account), done in zip(picked, claimed, strict=True):
        amount, proof = rewards.at(i)
        if amount > done:
            requests.append(ClaimRequest(node, rewards.epoch_id, account, amount, tuple(proof)))
    outcome = BulkClaim()
    for start in range(0, len(requests), MAX_CLAIMS_PER_TX):
        _claim_batch(contracts, requests[start:start + MAX_CLAIMS_PER_TX], outcome)
    for payee, reason in outcome.refused.items():
        log.error("cannot pay %s from node %s: %s", payee, node, reason)
    return outcome


def _claim_batch(contracts: Contracts, batch: list[ClaimRequest], outcome: BulkClaim) -> None:
    """Sends `batch` less the claims the chain refuses on their own. A batch that still reverts (payees
    that fail only together, or one blocked since the simulation) is sent again in halves, each simulated
    anew, so every claim that can be paid is paid."""
    for request, reason in _refusals(contracts, batch):
        outcome.refused[request.account] = reason
    batch = [c for c in batch if c.account not in outcome.refused]
    if not batch:
        return
    try:
        receipt = contracts.settlement.claim_many(batch)
    except TxNotMined:
        raise  # never more transactions behind a stuck one
    except ChainError as exc:
        if len(batch) == 1:
            outcome.refused[batch[0].account] = exc.message
            return
        log.warning("claimMany of %d payees reverted (%s): sending it in halves", len(batch), exc.message)
        mid = len(batch) // 2
        _claim_batch(contracts, batch[:mid], outcome)
        _claim_batch(contracts, batch[mid:], outcome)
        return
    for e in event_args(contracts.settlement.contract, receipt, "Claimed"):
        outcome.paid[to_checksum_address(e["account"])] = int(e["amount"])


def _refusals(contracts: Contracts, batch: list[ClaimRequest]) -> list[tuple[ClaimRequest, str]]:
    """The claims of `batch` that revert on their own, found by simulating halves (no gas spent)."""
    if not batch:
        return []
    try:
        contracts.settlement.simulate_claim_many(batch)
        return []
    except ChainError as exc:
        if len(batch) == 1:
            return [(batch[0], f"{exc.message} {exc.facts.get('args', '')}".strip())]
    mid = len(batch) // 2
    return _refusals(contracts, batch[:mid]) + _refusals(contracts, batch[mid:])
