"""Published trees are read once however many ask at once, read again once an adopted amend rewrote the
row's roots, and kept within their byte budget."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from node.db.models import EpochState, SettlementEpoch
from node.db.session import make_engine, session_factory, transaction, upgrade
from node.protocol.hexstr import to_hex
from node.settlement.earnings import earnings_from
from node.settlement.epoch_sources import EpochSources
from node.settlement.merkle import MerkleTree
from node.settlement.published_trees import PublishedTrees
from node.settlement.split import SplitParams

NODE = "0x" + "ab" * 20
NUM_READERS = 16


class CountingFactory:
    """The database's sessions, counting how many were opened (one per tree read)."""

    def __init__(self, factory: sessionmaker[Session]) -> None:
        self.factory, self.num_opened = factory, 0

    def __call__(self) -> Session:
        self.num_opened += 1
        return self.factory()


def _trees(num_leaves: int) -> tuple[MerkleTree, dict[str, Any]]:
    receipts = MerkleTree.of([[i] for i in range(num_leaves)], ("uint256",))
    rewards = MerkleTree.of([[NODE, 1]], ("address", "uint256"))
    return receipts, {"rewards": rewards.to_json(), "receipts": receipts.to_json()}


def _epochs(db_url: str, num: int) -> sessionmaker[Session]:
    upgrade(db_url)
    factory = session_factory(make_engine(db_url))
    receipts, trees = _trees(500)
    with transaction(factory) as session:
        for epoch_id in range(1, num + 1):
            session.add(SettlementEpoch(node=NODE, epoch_id=epoch_id, state=EpochState.FINAL,
                                        rewards_root="0x" + "22" * 32, rewards_total=1,
                                        receipts_root=to_hex(receipts.root), receipt_count=len(receipts),
                                        collected_total=1, trees=trees))
    return factory


def _row(factory: sessionmaker[Session], epoch_id: int) -> SettlementEpoch:
    with factory() as session:
        row = session.query(SettlementEpoch).filter_by(node=NODE, epoch_id=epoch_id).one()
        session.expunge(row)
        return row


def test_concurrent_readers_of_one_epoch_cost_one_read(db_url: str) -> None:
    factory = _epochs(db_url, 1)
    counting, cache, row = CountingFactory(factory), PublishedTrees(), _row(factory, 1)
    start = threading.Barrier(NUM_READERS)

    def read(_: int) -> bytes:
        start.wait()
        parsed = cache.get(counting, row)  # type: ignore[arg-type]
        assert parsed is not None
        return parsed.receipts.root

    with ThreadPoolExecutor(NUM_READERS) as pool:
        roots = set(pool.map(read, range(NUM_READERS)))
    assert roots == {bytes.fromhex(row.receipts_root[2:])} and counting.num_opened == 1  # type: ignore[index]


def test_a_row_rewritten_under_a_reader_is_never_cached_under_its_old_roots(db_url: str) -> None:
    factory = _epochs(db_url, 1)
    counting, cache = CountingFactory(factory), PublishedTrees()
    before = _row(factory, 1)  # the route read the row, then an amend was adopted before the trees were read
    with transaction(factory) as session:
        session.execute(update(SettlementEpoch).values(rewards_root="0x" + "33" * 32))
    assert cache.get(counting, before) is None, "the row changed since it was read"  # type: ignore[arg-type]
    after = _row(factory, 1)
    assert cache.get(counting, after) is not None  # type: ignore[arg-type]
    assert cache.get(counting, before) is None, "no tree kept under the old roots"  # type: ignore[arg-type]
    assert cache.get(counting, after) is not None and counting.num_opened == 3  # type: ignore[arg-type]


def test_the_cache_keeps_within_its_bytes(db_url: str) -> None:
    factory = _epochs(db_url, 4)
    counting = CountingFactory(factory)
    one = PublishedTrees().get(factory, _row(factory, 1))
    assert one is not None
    cache = PublishedTrees(max_bytes=2 * len(one.encoded))
    rows = [_row(factory, i) for i in (1, 2, 3, 4)]
    for row in rows + rows[-2:]:
        cache.get(counting, row)  # type: ignore[arg-type]
    assert counting.num_opened == 4, "the two newest stayed"
    cache.get(counting, rows[0])  # type: ignore[arg-type]
    assert counting.num_opened == 5, "the oldest was dropped"


def test_earnings_past_the_tree_budget_read_each_epoch_s_rewards_once(db_url: str) -> None:
    """The earnings read every published epoch's rewards: once the history outgrew the parsed trees' budget,
    every call read and parsed every epoch's whole trees again."""
    factory = _epochs(db_url, 4)
    one = PublishedTrees().get(factory, _row(factory, 1))
    assert one is not None
    counting, trees, sources = CountingFactory(factory), PublishedTrees(max_bytes=len(one.encoded)), EpochSources()
    params = SplitParams(treasury="0x" + "cd" * 20, node=NODE, protocol_bps=100, node_bps=200)
    first = earnings_from(counting, trees, sources, params, NODE)  # type: ignore[arg-type]
    opened = counting.num_opened
    assert earnings_from(counting, trees, sources, params, NODE) == first  # type: ignore[arg-type]
    assert counting.num_opened - opened == 1, "the page's rows and the claims: no epoch read again"
    assert first["earned"] == "1" and [e["epochId"] for e in first["epochs"]] == [1]
