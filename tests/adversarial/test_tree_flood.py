"""Reading a settled epoch's trees, free to anyone, cannot take the node from paying users.

GET /v1/epochs/{node}/{id} and GET /v1/receipts/{id}/proof loaded the epoch's whole tree JSON from the
database and parsed it on every call (and the epoch document was re-encoded whole), on the API's request
threads while holding a pooled database connection: a stranger keeping a few dozen of them in flight on a
busy epoch held the connections and threads the holds and charges of paid requests wait for. Published
trees never change for a given root: the node now parses each once, whoever asks, and serves proofs and
documents from that. Live node on anvil; the settled epoch is written into the outbox as the settlement
worker leaves it; the reads come from a process of their own."""

from __future__ import annotations

import httpx
import pytest
from sqlalchemy import select, update

from node.client.payer import Payer
from node.db.models import EpochState, Receipt, SettlementEpoch
from node.db.session import make_engine, session_factory, transaction
from node.protocol.hexstr import to_hex
from node.protocol.receipt import LEAF_TYPES, receipt_of_row
from node.settlement.merkle import MerkleTree
from tests.fixtures.flood import fastest_paid_seconds, paid_seconds_during_gets, signed_completions
from tests.fixtures.paid_node import PaidNode

pytestmark = [pytest.mark.chain, pytest.mark.slow]
NUM_LEAVES = 12_000  # a busy epoch's receipts
NUM_READING = 32
EPOCH_IDS = range(900, 906)  # a few of them: the listing and the earnings read every epoch


@pytest.fixture(scope="module")
def settled(paid_node: PaidNode) -> tuple[float, str, str]:
    """The node's receipts so far, settled by hand with many other leaves, as the worker would leave it
    (FINAL, trees published), the last epoch holding them. (a paid request's time before, the node, one
    receipt's id)."""
    payer = Payer(paid_node.payer_keys[0], paid_node.base_url)
    calm = fastest_paid_seconds(paid_node, signed_completions(paid_node, payer, 900))
    factory = session_factory(make_engine(paid_node.local.settings.resolved_database_url(), pooled=False))
    with transaction(factory) as session:
        receipts = list(session.scalars(select(Receipt).order_by(Receipt.id)))
        leaves = [receipt_of_row(r).leaf() for r in receipts]
        fillers = [[*leaves[0][:6], 10**12 + i, *leaves[0][7:]] for i in range(NUM_LEAVES - len(leaves))]
        tree = MerkleTree.of(leaves + fillers, LEAF_TYPES)
        owner = receipts[0].node
        rewards = MerkleTree.of([[owner, 1]], ("address", "uint256"))
        trees = {"rewards": rewards.to_json(), "receipts": tree.to_json()}
        for epoch_id in EPOCH_IDS:
            session.add(SettlementEpoch(node=owner, epoch_id=epoch_id, state=EpochState.FINAL,
                                        rewards_root=to_hex(rewards.root), rewards_total=1,
                                        receipts_root=to_hex(tree.root), receipt_count=len(tree),
                                        collected_total=1, trees=trees, tx_hash="0x" + "11" * 32))
        session.flush()
        session.execute(update(Receipt).where(Receipt.id.in_([r.id for r in receipts]))
                        .values(epoch_id=EPOCH_IDS[-1]))
        return calm, owner, receipts[-1].receipt_hash


def _reads(node: PaidNode, owner: str, receipt_id: str, what: str) -> list[str]:
    base = node.base_url
    return {"proofs and trees": [f"{base}/v1/receipts/{receipt_id}/proof", f"{base}/v1/epochs/{owner}/latest"],
            "epoch listings": [f"{base}/v1/epochs/{owner}?limit=500", f"{base}/v1/epochs/{owner}/latest/summary"],
            "earnings": [f"{base}/v1/earnings/{owner}/{owner}"]}[what]


@pytest.mark.parametrize("what", ["proofs and trees", "epoch listings", "earnings"])
def test_a_flood_of_tree_reads_does_not_hold_up_paid_requests(paid_node: PaidNode, settled: tuple[float, str, str],
                                                             what: str) -> None:
    calm, owner, receipt_id = settled
    proof = httpx.get(f"{paid_node.base_url}/v1/receipts/{receipt_id}/proof", timeout=60).json()
    assert MerkleTree.verify(bytes.fromhex(proof["receiptsRoot"][2:]), LEAF_TYPES, proof["leaf"],
                             [bytes.fromhex(p[2:]) for p in proof["proof"]])
    urls = _reads(paid_node, owner, receipt_id, what)
    assert all(httpx.get(url, timeout=60).status_code == 200 for url in urls)
    payer = Payer(paid_node.payer_keys[0], paid_node.base_url)
    first_lane = 910 + 10 * ["proofs and trees", "epoch listings", "earnings"].index(what)
    headers = signed_completions(paid_node, payer, first_lane)
    flooded = paid_seconds_during_gets(paid_node, headers, urls, NUM_READING)
    print(f"paid request alone {calm:.3f} s, during the {what} {flooded:.3f} s")
    assert flooded < calm + 5.0, f"a paid request took {flooded:.2f} s during a flood of {what} " \
                                 f"({calm:.2f} s without)"
