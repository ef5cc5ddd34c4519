"""After a guardian vetoes an epoch and amends it with a corrected root, the node follows the amend: every
payee claims the corrected amounts, and the node's next epoch builds on them (cumulative leaves), never on
the vetoed ones. Real anvil, real contracts, the real worker, SQLite and PostgreSQL.

The attack without this: a node whose root the guardian corrected keeps its own figures in its next epoch
(its leaves are cumulative, so once that epoch unlocks the correction is undone), or a worker that cannot
settle at all after an amend forgot epochs it had settled (nobody is paid again).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from node.db.models import EpochState, Receipt
from node.errors import ChainError
from node.protocol.hexstr import from_hex
from node.protocol.receipt import LEAF_TYPES
from node.settlement.amendment import adopt_amendment
from node.settlement.claims import claim, claim_all
from node.settlement.epoch_builder import cumulative_of, rewards_tree
from node.settlement.merkle import MerkleTree
from node.settlement.policy import EpochPolicy
from node.settlement.publication import epoch_document, export_epoch, published_epoch, receipt_proof
from tests.adversarial.settlement_steps import LONG, on_chain, tick_until
from tests.fixtures.settlement import GUARDIAN, OPERATOR, RELAYER, SettlementWorld, build_world

pytestmark = pytest.mark.chain
CHALLENGE_S = 3_600
CORRECTION = 1_000  # what the guardian moves from the node's leaf to the first contributor's


@pytest.fixture
def world(fresh_anvil: object, db_url: str) -> SettlementWorld:
    return build_world(fresh_anvil, db_url, challenge_period_s=CHALLENGE_S)  # type: ignore[arg-type]


def _settle(world: SettlementWorld, service: object, payer: int, fee: int, epoch_id: int) -> None:
    world.pay(payer, 0, world.adapter_ids[payer % 2], fee, validity_s=LONG)
    tick_until(world, service, epoch_id, EpochState.FINAL)  # type: ignore[arg-type]


def _leaves(world: SettlementWorld, epoch_id: int) -> dict[str, int]:
    with world.factory() as session:
        row = published_epoch(session, world.node, epoch_id)
        assert row is not None and row.trees is not None
        return cumulative_of(row.trees["rewards"])


def _corrected(world: SettlementWorld, through_epoch: int) -> dict[str, int]:
    """The guardian's correction of the node's tree at `through_epoch`: CORRECTION from node to contributor."""
    leaves = Counter(_leaves(world, through_epoch))
    contributor = world.lineages[world.adapter_ids[0]].datasets[0][0]
    leaves[world.node] -= CORRECTION
    leaves[contributor] += CORRECTION
    return dict(leaves)


def _receipts(world: SettlementWorld, epochs: range) -> dict:
    """The guardian's receipts tree over the vetoed and forgotten epochs' receipts, from their published trees."""
    values = []
    with world.factory() as session:
        for epoch_id in epochs:
            row = published_epoch(session, world.node, epoch_id)
            assert row is not None and row.trees is not None
            values += [v["value"] for v in row.trees["receipts"]["values"]]
    return MerkleTree.of(values, LEAF_TYPES).to_json()


def _write(path: Path, leaves: dict[str, int], world: SettlementWorld, receipts: dict | None) -> Path:
    """The guardian's file; without a receipts tree the amend keeps the vetoed epoch's receipts root."""
    path.write_text(json.dumps({"rewards": rewards_tree(leaves, world.node).to_json(), "receipts": receipts}))
    return path


def _every_receipt_proves_against_the_chain(world: SettlementWorld) -> None:
    settlement = world.contracts(OPERATOR).settlement
    with world.factory() as session:
        receipts = session.scalars(select(Receipt).where(Receipt.epoch_id.is_not(None))).all()
        assert len(receipts) == len(world.fees)
        for r in receipts:
            doc = receipt_proof(session, r.receipt_hash)
            assert doc is not None, f"receipt of epoch {r.epoch_id} has no proof"
            root = settlement.epoch(world.node, doc["epochId"]).receipts_root
            assert MerkleTree.verify(root, LEAF_TYPES, doc["leaf"], [from_hex(p) for p in doc["proof"]])


def _travel(world: SettlementWorld, seconds: int) -> None:
    world.anvil.rpc("evm_increaseTime", seconds)
    world.mine()


def _cli(world: SettlementWorld, tmp_path: Path, *args: str) -> str:
    from node.chain.deploy import write_deployment
    from node.cli import app

    env = {"LORANODE_DATABASE_URL": world.db_url, "LORANODE_RPC_URL": world.anvil.rpc_url,
           "LORANODE_OPERATOR_KEY": world.key(OPERATOR),
           "LORANODE_DEPLOYMENT_FILE": str(write_deployment(world.deployment, tmp_path / "deployments"))}
    result = CliRunner().invoke(app, list(args), env=env)
    assert result.exit_code == 0, result.output
    return result.output


def _amend_by_cli(world: SettlementWorld, node_epoch: int, tree_file: Path, tmp_path: Path) -> None:
    from node.cli import app

    guardian = ("--dev-account", str(GUARDIAN))
    _cli(world, tmp_path, "settle", "veto", "--node", world.node, "--epoch", str(node_epoch), *guardian)
    assert world.contracts(OPERATOR).settlement.first_vetoed_epoch(world.node) == node_epoch
    doc = json.loads(tree_file.read_text())
    greedy = tmp_path / "greedy.json"  # a tree above the pot is refused before any gas is spent
    greedy.write_text(json.dumps({"rewards": rewards_tree({world.node: 10**30}, world.node).to_json()}))
    refused = CliRunner().invoke(app, ["settle", "amend", "--node", world.node, "--tree", str(greedy), *guardian],
                                 env={"LORANODE_RPC_URL": world.anvil.rpc_url, "LORANODE_DEPLOYMENT_FILE":
                                      str(tmp_path / "deployments" / f"{world.deployment.chain_id}.json")})
    assert refused.exit_code != 0 and "whole pot" in refused.output, refused.output
    _cli(world, tmp_path, "settle", "amend", "--node", world.node, "--tree", str(tree_file), "--out",
         str(tmp_path / "amended.json"), *guardian)
    assert world.contracts(OPERATOR).settlement.first_vetoed_epoch(world.node) == 0
    assert doc["rewards"]["values"], "the same file goes to the operator"


@pytest.mark.parametrize("vetoed", [2, 3], ids=["forgets-a-later-epoch", "the-last-epoch"])
def test_every_payee_claims_the_amended_amounts_and_the_next_epoch_builds_on_them(
        world: SettlementWorld, vetoed: int, tmp_path: Path) -> None:
    service = world.service(EpochPolicy(max_age_s=0))
    for epoch_id, (payer, fee) in enumerate([(0, 3_000_001), (1, 4_000_003), (2, 5_000_007)], start=1):
        _settle(world, service, payer, fee, epoch_id)
    corrected = _corrected(world, 3)  # over everything the pot collected, epochs forgotten by the amend included
    receipts = _receipts(world, range(vetoed, 4)) if vetoed < 3 else None  # needed once an epoch is forgotten
    tree_file = _write(tmp_path / "corrected.json", corrected, world, receipts)
    amended = tmp_path / "amended.json"
    _amend_by_cli(world, vetoed, tree_file, tmp_path)

    world.pay(0, 1, world.adapter_ids[0], 7_000_011, validity_s=LONG)
    with pytest.raises(ChainError, match="adopt"):  # never a new epoch on the vetoed leaves
        for _ in range(3):
            service.tick()
            world.mine()
    assert on_chain(world)[0] == vetoed, "nothing settled on top of the vetoed tree"

    _travel(world, CHALLENGE_S + 1)  # payees need not wait for the operator: the guardian's file pays them
    contributor = world.lineages[world.adapter_ids[0]].datasets[0][0]
    early = claim(world.contracts(RELAYER), world.node, contributor, amended)
    assert early == corrected[contributor], "the corrected amount, from the guardian's file"

    assert f"amend of epoch {vetoed}" in _cli(world, tmp_path, "settle", "adopt", "--tree", str(amended))
    assert adopt_amendment(world.factory, world.contracts(OPERATOR).settlement, world.node,
                           json.loads(tree_file.read_text())) == vetoed, "adopting twice changes nothing"
    with world.factory() as session:  # what the API and `epoch export` publish for the amended epoch
        row = published_epoch(session, world.node, vetoed)
        assert row is not None and epoch_document(row)["rewardsRoot"] == row.rewards_root
        assert cumulative_of(row.trees["rewards"]) == {a: v for a, v in corrected.items() if v}
        assert published_epoch(session, world.node, vetoed + 1) is None or vetoed == 3

    tick_until(world, service, vetoed + 1, EpochState.FINAL)
    after = _leaves(world, vetoed + 1)
    expected = Counter(corrected)
    expected.update({a: v for a, v in world.expected_split().items()})
    expected.subtract({a: v for a, v in _split_before_last(world).items()})
    assert after == {a: v for a, v in expected.items() if v}, "the new epoch adds its shares to the amended leaves"
    total = 3_000_001 + 4_000_003 + 5_000_007 + 7_000_011
    assert on_chain(world) == (vetoed + 1, total, total - early)

    _travel(world, CHALLENGE_S + 1)
    export = export_epoch(world.factory, world.node, tmp_path / "latest.json")
    paid = claim_all(world.contracts(RELAYER), world.node, export).paid
    owed = {**after, contributor: after[contributor] - early}
    assert paid == owed, "every payee is paid its cumulative amount, the correction included"
    assert on_chain(world)[2] == 0, "nothing is left stuck in the pot"
    _every_receipt_proves_against_the_chain(world)


def _split_before_last(world: SettlementWorld) -> Counter[str]:
    """The split of every receipt but the last (what the corrected tree already covers)."""
    last_fee, last_adapter = world.fees.pop()
    try:
        return world.expected_split()
    finally:
        world.fees.append((last_fee, last_adapter))
