"""The API keeps settled epochs' trees parsed, and still never serves a tree the chain no longer holds:
warm it with every epoch and proof, then veto and amend epoch 2 (which forgets epoch 3), then adopt the
guardian's tree. Real anvil, real contracts, the real worker and indexer, SQLite and PostgreSQL."""

from __future__ import annotations

import httpx
import pytest
from sqlalchemy import select

from node.db.models import Receipt
from node.protocol.hexstr import to_hex
from node.settlement.amendment import adopt_amendment, amend
from node.settlement.epoch_builder import rewards_tree
from node.settlement.publication import epoch_document, published_epoch
from tests.adversarial.test_earnings_after_amend import CHALLENGE_S, _three_epochs
from tests.fixtures.settlement import GUARDIAN, OPERATOR, SettlementWorld, build_world
from tests.settlement.test_publication import serve

pytestmark = pytest.mark.chain


@pytest.fixture
def world(fresh_anvil: object, db_url: str) -> SettlementWorld:
    return build_world(fresh_anvil, db_url, challenge_period_s=CHALLENGE_S)  # type: ignore[arg-type]


def _served(url: str, world: SettlementWorld, receipt_id: str) -> tuple[dict[int, str | None], str | None]:
    """(each epoch's served rewards root, the served proof's receipts root of `receipt_id`)."""
    roots: dict[int, str | None] = {}
    for epoch_id in (1, 2, 3):
        resp = httpx.get(f"{url}/v1/epochs/{world.node}/{epoch_id}", timeout=30)
        roots[epoch_id] = resp.json()["rewardsRoot"] if resp.status_code == 200 else None
        assert resp.status_code in (200, 404), resp.text
    resp = httpx.get(f"{url}/v1/receipts/{receipt_id}/proof", timeout=30)
    assert resp.status_code in (200, 404), resp.text
    return roots, resp.json()["receiptsRoot"] if resp.status_code == 200 else None


def test_parsed_trees_never_outlive_the_amend_that_replaced_or_forgot_them(world: SettlementWorld) -> None:
    _, leaves = _three_epochs(world)
    settlement = world.contracts(OPERATOR).settlement
    with world.factory() as session:
        last = session.scalars(select(Receipt).order_by(Receipt.id.desc())).first()
        assert last is not None and last.epoch_id == 3
    with serve(world) as url:
        roots, proof_root = _served(url, world, last.receipt_hash)
        assert None not in roots.values() and proof_root == to_hex(settlement.epoch(world.node, 3).receipts_root)

        world.contracts(GUARDIAN).settlement.veto(world.node, 2)
        doc = {"rewards": rewards_tree(leaves[3], world.node).to_json()}
        amend(world.contracts(GUARDIAN).settlement, world.node, doc)
        world.mine()
        world.sync()
        assert _served(url, world, last.receipt_hash) == ({1: roots[1], 2: None, 3: None}, None)

        adopt_amendment(world.factory, settlement, world.node, doc)
        adopted, proof_root = _served(url, world, last.receipt_hash)
        corrected = to_hex(settlement.epoch(world.node, 2).rewards_root)
        assert adopted == {1: roots[1], 2: corrected, 3: None} and corrected != roots[2] and proof_root is None
        with world.factory() as session:
            row = published_epoch(session, world.node, 2)
            assert row is not None
            assert httpx.get(f"{url}/v1/epochs/{world.node}/2", timeout=30).json() == epoch_document(row)
