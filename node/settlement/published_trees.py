"""A published epoch's trees, read and parsed once, whoever asks.

A settled epoch's trees are the largest thing the node serves for free (a few hundred bytes a receipt):
GET /v1/epochs/{node}/{id}, a receipt's proof and an account's earnings read them. A tree never changes
under a given outbox row and roots: an amend the operator adopts writes new roots (node/settlement/
amendment.py), so the key (row id, rewards root, receipts root) names one tree forever and a changed row
is read again. Which epochs may be published at all (node/settlement/overrule.py) is still asked of the
database on every call, before the trees are looked up here: the cache only spares reading and parsing
them. Concurrent readers of one epoch wait for one read (single flight: node/flight_cache.py), at
most MAX_LOADING epochs are read at once, each on a connection of its own taken only for that read, and the
parsed trees are kept least recently used first within `max_bytes` of their JSON.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, defer, sessionmaker

from node.db.models import SettlementEpoch
from node.flight_cache import FlightCache
from node.protocol.hexstr import from_hex
from node.settlement.epoch_builder import cumulative_of
from node.settlement.merkle import MerkleTree

WITHOUT_TREES = (defer(SettlementEpoch.trees), defer(SettlementEpoch.batch))  # an outbox row's figures only
MAX_LOADING = 2
TreeKey = tuple[int, str | None, str | None]


@dataclass(frozen=True)
class ParsedTrees:
    """One epoch's published trees: the receipts tree with each leaf's position, the rewards tree's
    cumulative amounts, and both dumps as the JSON the epoch document carries."""

    receipts: MerkleTree
    positions: dict[bytes, int]  # leaf hash -> value index
    cumulative: dict[str, int]  # checksummed account -> cumulative amount in the rewards tree
    encoded: bytes  # `"rewards":{...},"receipts":{...}`

    @classmethod
    def of(cls, trees: dict[str, Any]) -> ParsedTrees:
        receipts = tree_of(trees["receipts"])
        encoded = json.dumps({"rewards": trees["rewards"], "receipts": trees["receipts"]},
                             separators=(",", ":")).encode()[1:-1]
        return cls(receipts, {receipts.leaf(i): i for i in range(len(receipts))}, cumulative_of(trees["rewards"]),
                   encoded)


def tree_of(dump: dict[str, Any]) -> MerkleTree:
    """A published tree as a MerkleTree, without re-hashing it (callers check the root on chain)."""
    return MerkleTree(tuple(dump["leafEncoding"]), tuple(tuple(v["value"]) for v in dump["values"]),
                      tuple(from_hex(h) for h in dump["tree"]),
                      tuple(int(v["treeIndex"]) for v in dump["values"]))


def key_of(row: SettlementEpoch) -> TreeKey:
    return row.id, row.rewards_root, row.receipts_root


@dataclass
class PublishedTrees:
    """The parsed trees of published epochs, least recently used first, within `max_bytes` of JSON."""

    max_bytes: int = 256 << 20
    max_amounts: int = 1_000_000  # (account, cumulative amount) pairs of rewards trees, kept apart
    _cache: FlightCache[TreeKey, ParsedTrees | None] = field(init=False)
    _rewards: FlightCache[TreeKey, dict[str, int]] = field(init=False)

    def __post_init__(self) -> None:
        self._cache = FlightCache(self.max_bytes, lambda parsed: len(parsed.encoded) if parsed else 0, MAX_LOADING)
        self._rewards = FlightCache(self.max_amounts, len, MAX_LOADING)

    def cumulative(self, factory: sessionmaker[Session], row: SettlementEpoch) -> dict[str, int]:
        """The cumulative amounts of outbox row `row`'s rewards tree per checksummed account ({} if the row has
        none or has changed since). Kept apart from the parsed trees, a few dozen bytes an account where the
        trees take a few hundred a receipt: the earnings read those of their page's epochs and of their totals'
        trees, and read none again however far the history outgrows `max_bytes`."""
        return self._rewards.get(key_of(row), lambda key: _read_rewards(factory, key))

    def get(self, factory: sessionmaker[Session], row: SettlementEpoch) -> ParsedTrees | None:
        """The trees of outbox row `row` (read without them, WITHOUT_TREES); None if the row has none or
        has changed since (ask again)."""
        return self._cache.get(key_of(row), lambda key: _read(factory, key))


def _read_rewards(factory: sessionmaker[Session], key: TreeKey) -> tuple[dict[str, int], bool]:
    """(the cumulative amounts of the rewards tree of the row under `key`, whether to keep them): the
    rewards tree alone is read; nothing is kept if the row has none or other roots now."""
    row_id, rewards_root, receipts_root = key
    q = select(SettlementEpoch.trees["rewards"]).where(
        SettlementEpoch.id == row_id, SettlementEpoch.rewards_root == rewards_root,
        SettlementEpoch.receipts_root == receipts_root)
    with factory() as session:
        dump = session.scalar(q)
    return (cumulative_of(dump), True) if dump else ({}, False)


def _read(factory: sessionmaker[Session], key: TreeKey) -> tuple[ParsedTrees | None, bool]:
    """(the trees of the row under `key`, whether to keep them): None if the row has none or other roots now."""
    row_id, rewards_root, receipts_root = key
    q = select(SettlementEpoch.trees).where(SettlementEpoch.id == row_id, SettlementEpoch.rewards_root == rewards_root,
                                            SettlementEpoch.receipts_root == receipts_root)
    with factory() as session:
        trees = session.scalar(q)
    if trees is None or not {"rewards", "receipts"} <= trees.keys():
        return None, False
    return ParsedTrees.of(trees), True
