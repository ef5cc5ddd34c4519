"""Reading a settled epoch's trees, free to anyone, cannot take the node from paying users.

GET /v1/epochs/{node}/{id} and GET /v1/receipts/{id}/proof loaded the epoch's whole tree JSON from the
database and parsed it on every call (and the epoch document was re-encoded whole), on the API's request
threads while holding a pooled database connection: a stranger keeping a few dozen of them in flight on a
busy epoch held the connections and threads the holds and charges of paid requests wait for. Published
trees never change for a given root: the node now parses each once, whoever asks, and serves proofs and
documents from that. Live node on anvil; the settled epoch is written into the outbox as the settlement
worker leaves it; the reads come from a process of their own."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest
from sqlalchemy import select, update

from node.client.payer import Payer
from node.db.models import EpochState, Receipt, SettlementEpoch
from node.db.session import make_engine, session_factory, transaction
from node.protocol.hexstr import to_hex
from node.protocol.receipt import LEAF_TYPES, receipt_of_row
from node.settlement.merkle import MerkleTree
from tests.adversarial.test_model_list_flood import _paid_seconds, _signed
from tests.fixtures.paid_node import PaidNode

pytestmark = [pytest.mark.chain, pytest.mark.slow]
NUM_LEAVES = 12_000  # a busy epoch's receipts
NUM_READING = 32
EPOCH_ID = 900
FLOOD = """
import asyncio, sys
import aiohttp

async def main(urls, num):
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=num)) as session:
        async def ask(i):
            while True:
                async with session.get(urls[i % len(urls)]) as resp:
                    await resp.read()
                    if i < 2:
                        print(resp.status, flush=True)
        await asyncio.gather(*(ask(i) for i in range(num)))

asyncio.run(main(sys.argv[1:3], int(sys.argv[3])))
"""


def _settle_by_hand(node: PaidNode) -> tuple[str, str]:
    """The node's receipts so far, settled in one epoch with many other leaves, as the worker would leave
    it (FINAL, trees published). Returns the node and one receipt's id."""
    factory = session_factory(make_engine(node.local.settings.resolved_database_url(), pooled=False))
    with transaction(factory) as session:
        receipts = list(session.scalars(select(Receipt).order_by(Receipt.id)))
        leaves = [receipt_of_row(r).leaf() for r in receipts]
        fillers = [[*leaves[0][:6], 10**12 + i, *leaves[0][7:]] for i in range(NUM_LEAVES - len(leaves))]
        tree = MerkleTree.of(leaves + fillers, LEAF_TYPES)
        rewards = MerkleTree.of([[receipts[0].node, 1]], ("address", "uint256"))
        owner = receipts[0].node
        session.add(SettlementEpoch(node=owner, epoch_id=EPOCH_ID, state=EpochState.FINAL,
                                    rewards_root=to_hex(rewards.root), rewards_total=1,
                                    receipts_root=to_hex(tree.root), receipt_count=len(tree), collected_total=1,
                                    trees={"rewards": rewards.to_json(), "receipts": tree.to_json()},
                                    tx_hash="0x" + "11" * 32))
        session.flush()
        session.execute(update(Receipt).where(Receipt.id.in_([r.id for r in receipts])).values(epoch_id=EPOCH_ID))
        return owner, receipts[-1].receipt_hash


def test_a_flood_of_tree_reads_does_not_hold_up_paid_requests(paid_node: PaidNode) -> None:
    payer = Payer(paid_node.payer_keys[0], paid_node.base_url)
    calm = _paid_seconds(paid_node, _signed(paid_node, payer, 900))
    owner, receipt_id = _settle_by_hand(paid_node)
    proof_url, epoch_url = f"{paid_node.base_url}/v1/receipts/{receipt_id}/proof", \
        f"{paid_node.base_url}/v1/epochs/{owner}/{EPOCH_ID}"
    proof = httpx.get(proof_url, timeout=60).json()
    assert MerkleTree.verify(bytes.fromhex(proof["receiptsRoot"][2:]), LEAF_TYPES, proof["leaf"],
                             [bytes.fromhex(p[2:]) for p in proof["proof"]])
    assert len(httpx.get(epoch_url, timeout=60).json()["receipts"]["values"]) == NUM_LEAVES
    headers = _signed(paid_node, payer, 910)
    flood = subprocess.Popen([sys.executable, "-c", FLOOD, proof_url, epoch_url, str(NUM_READING)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert flood.stdout is not None
        for _ in range(4):
            assert flood.stdout.readline().strip() == "200"
        flooded = _paid_seconds(paid_node, headers)
    finally:
        flood.kill()
        flood.wait()
    print(f"paid request alone {calm:.3f} s, during the tree reads {flooded:.3f} s")
    assert flooded < calm + 5.0, f"a paid request took {flooded:.2f} s during a flood of tree reads " \
                                 f"({calm:.2f} s without)"
