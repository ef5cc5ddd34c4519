"""The published trees over HTTP: the epoch route, a receipt's proof against the on-chain root, and
a claim whose proof comes from the API."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from node.api.error_handlers import install_error_handlers
from node.api.routes import epochs
from node.chain.anvil import Anvil, free_port
from node.db.models import EpochState
from node.protocol.receipt import LEAF_TYPES
from node.settlement.claims import claim
from node.settlement.merkle import MerkleTree
from node.settlement.published_trees import PublishedTrees
from node.settlement.service import SettlementService
from tests.fixtures.settlement import OPERATOR, RELAYER, SettlementWorld, build_world

pytestmark = pytest.mark.chain


@contextmanager
def serve(world: SettlementWorld) -> Iterator[str]:
    """Only the settlement routes, over the world's database, on a loopback port."""
    app = FastAPI()
    app.state.services = SimpleNamespace(db=world.factory, trees=PublishedTrees())
    install_error_handlers(app)
    app.include_router(epochs.router)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture
def api(sqlite_world: SettlementWorld) -> Iterator[str]:
    with serve(sqlite_world) as url:
        yield url


def settle_now(world: SettlementWorld, service: SettlementService) -> int:
    epoch_id = service.close_epoch()
    assert epoch_id is not None
    for _ in range(20):
        if service.step() is EpochState.FINAL:
            return epoch_id
        world.mine()
        world.sync()
    raise AssertionError(f"epoch {epoch_id} not final")


def test_trees_and_receipt_proofs_are_served_and_verify_on_chain_roots(sqlite_world: SettlementWorld,
                                                                       api: str) -> None:
    world = sqlite_world
    a, b = world.adapter_ids
    receipt_ids = [world.pay(0, 0, a, 10_007), world.pay(1, 0, b, 20_011), world.pay(0, 0, b, 30_013)]
    node = world.node
    assert httpx.get(f"{api}/v1/receipts/{receipt_ids[0]}/proof").status_code == 404  # not settled yet
    epoch_id = settle_now(world, world.service())
    on_chain = world.contracts(OPERATOR).settlement.epoch(node, epoch_id)

    doc = httpx.get(f"{api}/v1/epochs/{node}/latest").json()
    assert doc == httpx.get(f"{api}/v1/epochs/{node}/{epoch_id}").json()
    assert (doc["epochId"], doc["receiptCount"], doc["state"]) == (epoch_id, 3, "final")
    assert MerkleTree.load(doc["rewards"]).root == on_chain.rewards_root  # every hash re-checked
    assert MerkleTree.load(doc["receipts"]).root == on_chain.receipts_root
    for receipt_id in receipt_ids:
        proof = httpx.get(f"{api}/v1/receipts/{receipt_id}/proof").json()
        assert proof["epochId"] == epoch_id and proof["leafEncoding"] == list(LEAF_TYPES)
        assert MerkleTree.verify(on_chain.receipts_root, LEAF_TYPES, proof["leaf"],
                                 [bytes.fromhex(p[2:]) for p in proof["proof"]])
    assert httpx.get(f"{api}/v1/epochs/{node}/{epoch_id + 1}").status_code == 404
    assert httpx.get(f"{api}/v1/epochs/{node}/nope").status_code == 400

    owner = world.lineages[b].owner
    due = world.expected_split()[owner]
    assert due > 0 and claim(world.contracts(RELAYER), node, owner, api) == due
    assert claim(world.contracts(RELAYER), node, owner, api) == 0


def test_a_claim_uses_the_newest_epoch_past_its_challenge_period(fresh_anvil: Anvil, tmp_path: Path) -> None:
    world = build_world(fresh_anvil, f"sqlite:///{tmp_path / 'locked.db'}", challenge_period_s=3_600)
    a, _ = world.adapter_ids
    owner, service = world.lineages[a].owner, world.service()
    world.pay(0, 0, a, 100_003)
    settle_now(world, service)
    first_due = world.expected_split()[owner]
    world.anvil.rpc("evm_increaseTime", 3_601)  # epoch 1 unlocks; epoch 2 will still be locked
    world.mine()
    world.pay(0, 0, a, 900_001)
    settle_now(world, service)
    with serve(world) as url:
        assert claim(world.contracts(RELAYER), world.node, owner, url) == first_due  # from epoch 1
        world.anvil.rpc("evm_increaseTime", 3_601)
        world.mine()
        rest = world.expected_split()[owner] - first_due
        assert claim(world.contracts(RELAYER), world.node, owner, url) == rest > 0  # epoch 2: the remainder
