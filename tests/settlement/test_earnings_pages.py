"""An account's earnings are paged: one call reads the epochs of its page and the trees of its totals,
whatever the length of the node's history.

GET /v1/earnings/{node}/{account} read every published epoch's row, the mirror row of every settled
epoch and every epoch's rewards, and listed every epoch the account earned in. The node and the treasury
earn in every epoch, so each free call for theirs cost more, and answered more, as the node grew older:
a stranger asking for them over and over made the node serve its whole history each time."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from node.db.models import EpochState, SettlementEpoch
from node.db.session import make_engine, session_factory, transaction, upgrade
from node.protocol.hexstr import to_hex
from node.settlement.earnings import MAX_PAGE, earnings_from
from node.settlement.epoch_sources import EpochSources
from node.settlement.merkle import MerkleTree
from node.settlement.published_trees import PublishedTrees
from node.settlement.split import SplitParams
from tests.settlement.test_published_trees import NODE, CountingFactory

NUM_EPOCHS = 8 * MAX_PAGE
RARE = "0x" + "ef" * 20  # earns in the first epoch only
RARE_AMOUNT = 5
PARAMS = SplitParams(treasury="0x" + "cd" * 20, node=NODE, protocol_bps=100, node_bps=200)


def _history(db_url: str) -> sessionmaker[Session]:
    """NUM_EPOCHS published epochs; the node earns 1 in each (its cumulative amount is the epoch id)."""
    upgrade(db_url)
    factory = session_factory(make_engine(db_url))
    receipts = MerkleTree.of([[1]], ("uint256",))
    with transaction(factory) as session:
        for epoch_id in range(1, NUM_EPOCHS + 1):
            rewards = MerkleTree.of([[NODE, epoch_id], [RARE, RARE_AMOUNT]], ("address", "uint256"))
            session.add(SettlementEpoch(node=NODE, epoch_id=epoch_id, state=EpochState.FINAL,
                                        rewards_root=to_hex(rewards.root), rewards_total=epoch_id + RARE_AMOUNT,
                                        receipts_root=to_hex(receipts.root), receipt_count=1,
                                        collected_total=epoch_id + RARE_AMOUNT,
                                        trees={"rewards": rewards.to_json(), "receipts": receipts.to_json()}))
    return factory


def _pages(factory: sessionmaker[Session], account: str) -> list[dict[str, Any]]:
    """Every page of `account`'s earnings, following `next`."""
    trees, sources = PublishedTrees(), EpochSources()
    pages = [earnings_from(factory, trees, sources, PARAMS, account)]
    while pages[-1]["next"] is not None:
        pages.append(earnings_from(factory, trees, sources, PARAMS, account, before=pages[-1]["next"]))
    return pages


def test_a_call_for_the_node_s_earnings_reads_one_page_however_long_the_history(db_url: str) -> None:
    factory = _history(db_url)
    counting = CountingFactory(factory)
    doc = earnings_from(counting, PublishedTrees(), EpochSources(), PARAMS, NODE)  # type: ignore[arg-type]
    print(f"{NUM_EPOCHS} epochs of history: {len(doc['epochs'])} listed, {counting.num_opened} connections taken")
    assert len(doc["epochs"]) == MAX_PAGE, f"{len(doc['epochs'])} epochs in one answer"
    assert counting.num_opened <= 2 * MAX_PAGE + 3, \
        f"{counting.num_opened} connections for one call: more than the page's trees and one replay of each epoch"
    assert doc["earned"] == doc["unclaimed"] == str(NUM_EPOCHS), "the total comes from the newest tree"
    assert [e["epochId"] for e in doc["epochs"]] == list(range(NUM_EPOCHS - MAX_PAGE + 1, NUM_EPOCHS + 1))
    assert doc["next"] == NUM_EPOCHS - MAX_PAGE + 1


def test_following_next_lists_every_epoch_once(db_url: str) -> None:
    factory = _history(db_url)
    pages = _pages(factory, NODE)
    listed = [e["epochId"] for page in pages for e in page["epochs"]]
    assert sorted(listed) == list(range(1, NUM_EPOCHS + 1)), "every epoch once"
    assert all(e["earned"] == "1" for page in pages for e in page["epochs"])
    assert len(pages) == NUM_EPOCHS // MAX_PAGE and all(page["earned"] == str(NUM_EPOCHS) for page in pages)


def test_an_account_that_earned_long_ago_finds_its_epoch_by_following_next(db_url: str) -> None:
    factory = _history(db_url)
    pages = _pages(factory, RARE)
    assert pages[0]["earned"] == str(RARE_AMOUNT) and pages[0]["epochs"] == []
    assert [(e["epochId"], e["earned"]) for page in pages for e in page["epochs"]] == [(1, str(RARE_AMOUNT))]
    stranger = earnings_from(factory, PublishedTrees(), EpochSources(), PARAMS, "0x" + "77" * 20)
    assert stranger["earned"] == "0" and stranger["epochs"] == [] and stranger["next"] is None, \
        "nothing earned before an epoch that holds nothing: no next page"
