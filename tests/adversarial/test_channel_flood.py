"""Asking for a lane's charged total, free to anyone, cannot take the node from paying users.

GET /v1/channels/{payer}/{lane} tells the lane's charged total and the payer's spendable escrow. It read
every lane of the payer, what the chain collected on each and every loss written off on them, as rows into
the API process, on every call, on the API's request threads while holding a pooled database connection.
A payer opens lanes at will (a hold on a fresh lane, released, leaves its row), so a stranger asking a few
dozen times at once about a payer with many lanes held the connections and the CPU that the holds and
charges of paid requests need. Now the call reads its own lane by key and the payer's uncollected total as
one sum in the database. Live node on anvil; the lanes, collections and losses are written as the ledger,
the indexer and settlement leave them; the reads come from a process of their own."""

from __future__ import annotations

from datetime import UTC, datetime

import httpx
import pytest
from eth_account import Account
from sqlalchemy import insert

from node.client.payer import Payer
from node.db.loss import LossReason
from node.db.models import Lane, Loss
from node.db.payment_models import EscrowAccount, LaneCollection
from node.db.session import make_engine, session_factory, transaction
from tests.fixtures.flood import fastest_paid_seconds, paid_seconds_during_gets, signed_completions
from tests.fixtures.paid_node import PaidNode

pytestmark = [pytest.mark.chain, pytest.mark.slow]
NUM_LANES = 30_000  # the asked-about payer's lanes at this node
FIRST_LANE = 100_000
NUM_ASKING = 32
CHARGED = 10**12  # on each lane: a third collected in full, a third in part, a third not yet


Rows = list[dict[str, object]]


def _history(payer: str, node: str) -> tuple[Rows, Rows, Rows, int]:
    """(lanes, collections, written-off losses) of `payer` at `node`, and what they leave uncollected."""
    now = datetime.now(UTC)
    lanes: Rows = []
    collections: Rows = []
    losses: Rows = []
    owed = 0
    for i in range(NUM_LANES):
        lane, charged = FIRST_LANE + i, CHARGED + i
        collected = (0, charged, CHARGED // 2)[i % 3]
        lost = 1_000 if i % 10 == 0 else 0
        lanes.append({"payer": payer, "node": node, "lane": lane, "charged_total": charged,
                      "last_cumulative": charged, "reserved": 0, "updated_at": now})
        if collected:
            collections.append({"payer": payer, "node": node, "lane": lane, "collected": collected,
                                "last_cumulative": collected, "block_number": 1, "updated_block": 1, "is_final": True})
        if lost:
            losses.append({"node": node, "payer": payer, "lane": lane, "amount": lost, "epoch_id": 1,
                           "reason": LossReason.SETTLE_REFUSED.value, "created_at": now})
        owed += max(charged - collected - lost, 0)
    return lanes, collections, losses, owed


@pytest.fixture(scope="module")
def busy_payer(paid_node: PaidNode) -> tuple[float, str, int]:
    """A funded payer with NUM_LANES lanes at the node. (a paid request's time before, the payer, its spendable
    escrow: final deposits less thawing and what its lanes leave uncollected)."""
    calm = fastest_paid_seconds(paid_node, signed_completions(paid_node, Payer(paid_node.payer_keys[0],
                                                                               paid_node.base_url), 1_200))
    payer = Account.from_key(paid_node.payer_keys[1]).address.lower()
    node = httpx.get(f"{paid_node.base_url}/v1/node", timeout=60).json()["node"].lower()
    factory = session_factory(make_engine(paid_node.local.settings.resolved_database_url(), pooled=False))
    lanes, collections, losses, owed = _history(payer, node)
    with transaction(factory) as session:
        for rows, model in ((lanes, Lane), (collections, LaneCollection), (losses, Loss)):
            for first in range(0, len(rows), 5_000):
                session.execute(insert(model), rows[first:first + 5_000])
        acct = session.get(EscrowAccount, (payer, node))
        assert acct is not None
        spendable = acct.balance - acct.pending_deposits - acct.thawing - owed
    return calm, payer, spendable


def test_the_channel_tells_the_lane_and_what_all_lanes_leave_spendable(paid_node: PaidNode,
                                                                     busy_payer: tuple[float, str, int]) -> None:
    _, payer, spendable = busy_payer
    doc = httpx.get(f"{paid_node.base_url}/v1/channels/{payer}/{FIRST_LANE + 4}", timeout=60).json()
    assert (doc["chargedTotal"], doc["lastCumulative"]) == (str(CHARGED + 4), str(CHARGED + 4))
    assert doc["spendable"] == str(spendable)
    assert 0 < spendable < 1_000 * 10**18, "the uncollected lanes count against the escrow"
    fresh = httpx.get(f"{paid_node.base_url}/v1/channels/{payer}/7", timeout=60).json()
    assert (fresh["chargedTotal"], fresh["spendable"]) == ("0", str(spendable))


def test_a_flood_of_channel_reads_does_not_hold_up_paid_requests(paid_node: PaidNode,
                                                                busy_payer: tuple[float, str, int]) -> None:
    calm, payer, _ = busy_payer
    urls = [f"{paid_node.base_url}/v1/channels/{payer}/{FIRST_LANE + i}" for i in range(4)]
    headers = signed_completions(paid_node, Payer(paid_node.payer_keys[0], paid_node.base_url), 1_210)
    flooded = paid_seconds_during_gets(paid_node, headers, urls, NUM_ASKING)
    print(f"paid request alone {calm:.3f} s, during the channel reads {flooded:.3f} s")
    assert flooded < calm + 5.0, f"a paid request took {flooded:.2f} s during a flood of channel reads " \
                                 f"({calm:.2f} s without)"
