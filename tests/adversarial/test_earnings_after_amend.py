"""`loranode earnings` and claims after a guardian's veto and amend: never an epoch the chain forgot,
never a claimable amount the chain would not pay, and what the chain does pay stays claimable. Real
anvil, real contracts, the real worker and indexer, SQLite and PostgreSQL.

The attack without this: the guardian vetoes epoch 2 and amends it, which forgets epoch 3. The node's
epoch 3 stays published (its mirror row keeps its old roots) so its payees were told it was
"claimable", with its amount in `claimableNow`: money the chain will never pay against that tree.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import select

from node.db.models import EpochState, Receipt
from node.protocol.hexstr import to_hex
from node.settlement.amendment import adopt_amendment, amend
from node.settlement.claims import claim
from node.settlement.earnings import earnings
from node.settlement.epoch_builder import rewards_tree
from node.settlement.policy import EpochPolicy
from node.settlement.publication import published_epoch, receipt_proof
from node.settlement.split import SplitParams
from tests.adversarial.settlement_steps import LONG, tick_until
from tests.fixtures.settlement import (
    GUARDIAN,
    NODE_BPS,
    OPERATOR,
    PROTOCOL_BPS,
    RELAYER,
    SettlementWorld,
    build_world,
)
from tests.settlement.test_publication import serve

pytestmark = pytest.mark.chain
CHALLENGE_S = 3_600
CLAIMABLE = ("claimable", "partly claimed")


@pytest.fixture
def world(fresh_anvil: object, db_url: str) -> SettlementWorld:
    return build_world(fresh_anvil, db_url, challenge_period_s=CHALLENGE_S)  # type: ignore[arg-type]


def _report(world: SettlementWorld, account: str, limit: int = 50) -> dict[str, Any]:
    params = SplitParams(world.deployment.treasury, world.node, PROTOCOL_BPS, NODE_BPS)
    now = datetime.fromtimestamp(world.w3.eth.get_block("latest")["timestamp"], UTC)  # type: ignore[typeddict-item]
    with world.factory() as session:
        return earnings(session, params, account, now=now, limit=limit)


def _assert_only_what_the_chain_pays(world: SettlementWorld, report: dict[str, Any]) -> None:
    settlement = world.contracts(OPERATOR).settlement
    for entry in report["epochs"]:
        if entry["status"] in CLAIMABLE:
            assert settlement.is_claimable(world.node, entry["epochId"]), f"epoch {entry['epochId']} is not claimable"


def _three_epochs(world: SettlementWorld) -> tuple[str, dict[int, dict[str, int]]]:
    """Epochs 1 to 3 settled; (a contributor who earns in epochs 1 and 3, the leaves of epochs 1 and 3)."""
    service = world.service(EpochPolicy(max_age_s=0))
    for epoch_id, (payer, fee) in enumerate([(0, 3_000_001), (1, 4_000_003), (0, 5_000_007)], start=1):
        world.pay(payer, 0, world.adapter_ids[payer % 2], fee, validity_s=LONG)
        tick_until(world, service, epoch_id, EpochState.FINAL)
    with world.factory() as session:
        rows = {i: published_epoch(session, world.node, i) for i in (1, 3)}
        leaves = {i: {world.w3.to_checksum_address(v["value"][0]): int(v["value"][1])
                      for v in row.trees["rewards"]["values"]} for i, row in rows.items() if row}
    who = world.lineages[world.adapter_ids[0]].datasets[0][0]  # earns in epochs 1 and 3, not in 2
    assert leaves[3][who] > leaves[1][who]
    return who, leaves


def _travel(world: SettlementWorld) -> None:
    world.anvil.rpc("evm_increaseTime", CHALLENGE_S + 1)
    world.mine()
    world.sync()


def test_earnings_never_show_an_epoch_the_amend_forgot(world: SettlementWorld) -> None:
    who, leaves = _three_epochs(world)
    world.contracts(GUARDIAN).settlement.veto(world.node, 2)
    _travel(world)  # epochs 1 and 3 unlock; 3 is behind the veto
    vetoed = _report(world, who)
    _assert_only_what_the_chain_pays(world, vetoed)
    assert vetoed["claimableNow"] == str(leaves[1][who]), "only epoch 1 pays while the node is vetoed"
    last_page = _report(world, who, limit=1)  # epoch 3 alone: the veto of epoch 2 is on no page of its
    assert [(e["epochId"], e["status"]) for e in last_page["epochs"]] == [(3, "vetoed")] and last_page["next"] == 3
    assert last_page["claimableNow"] == vetoed["claimableNow"]

    doc = {"rewards": rewards_tree(leaves[3], world.node).to_json()}  # the guardian keeps every amount
    amend(world.contracts(GUARDIAN).settlement, world.node, doc)
    _travel(world)
    amended = _report(world, who)
    _assert_only_what_the_chain_pays(world, amended)
    assert [e["epochId"] for e in amended["epochs"]] == [1], "epoch 3 forgotten, epoch 2's tree replaced"
    assert amended["forgottenEpochs"] == [2, 3]
    assert amended["earned"] == amended["claimableNow"] == str(leaves[1][who])

    assert adopt_amendment(world.factory, world.contracts(OPERATOR).settlement, world.node, doc) == 2
    world.mine()
    world.sync()
    adopted = _report(world, who)
    _assert_only_what_the_chain_pays(world, adopted)
    assert [e["epochId"] for e in adopted["epochs"]] == [1, 2]
    assert adopted["earned"] == adopted["claimableNow"] == str(leaves[3][who]), "the amended tree pays it all"
    assert to_hex(world.contracts(OPERATOR).settlement.epoch(world.node, 2).rewards_root) == to_hex(
        rewards_tree(leaves[3], world.node).root)

    world.pay(0, 0, world.adapter_ids[0], 6_000_011, validity_s=LONG)  # epoch 3 again, on the amended leaves
    tick_until(world, world.service(EpochPolicy(max_age_s=0)), 3, EpochState.FINAL)
    _travel(world)
    resettled = _report(world, who)
    _assert_only_what_the_chain_pays(world, resettled)
    assert [e["epochId"] for e in resettled["epochs"]] == [1, 2, 3] and resettled["forgottenEpochs"] == []
    assert resettled["claimableNow"] == str(world.expected_split()[who]), "the new epoch 3 stands"


def test_a_claim_from_the_api_walks_back_past_epochs_it_no_longer_publishes(world: SettlementWorld) -> None:
    """Amended, not adopted yet: the API still publishes epoch 3 (forgotten) and epoch 2's vetoed tree
    (replaced on chain). A payee's claim walked back to epoch 2 and stopped with 'the published rewards
    tree does not match the chain' instead of being paid what epoch 1 already owed it."""
    who, leaves = _three_epochs(world)
    world.contracts(GUARDIAN).settlement.veto(world.node, 2)
    amend(world.contracts(GUARDIAN).settlement, world.node, {"rewards": rewards_tree(leaves[3], world.node).to_json()})
    _travel(world)
    with serve(world) as url:
        assert claim(world.contracts(RELAYER), world.node, who, url) == leaves[1][who]


def _published(world: SettlementWorld) -> tuple[int | None, dict[int, str | None], str | None]:
    """(the latest published epoch, each epoch's published rewards root, the proof's root of epoch 3's receipt)."""
    with world.factory() as session:
        latest = published_epoch(session, world.node)
        roots = {i: getattr(published_epoch(session, world.node, i), "rewards_root", None) for i in (1, 2, 3)}
        receipt = session.scalars(select(Receipt).where(Receipt.node == world.node.lower())
                                  .order_by(Receipt.id.desc())).first()
        assert receipt is not None
        proof = receipt_proof(session, receipt.receipt_hash)
    return (None if latest is None else latest.epoch_id), roots, (None if proof is None else proof["receiptsRoot"])


def test_the_api_never_publishes_a_tree_the_amend_replaced_or_forgot(world: SettlementWorld) -> None:
    """The node's outbox keeps epoch 2's vetoed tree and forgotten epoch 3 until the operator adopts (adopt
    reads them), but what is published is only what the chain holds: `latest` was epoch 3 (a tree no
    epoch of the chain holds), epoch 2 served the vetoed root, and epoch 3's receipts got proofs
    against a receipts root the chain forgot."""
    _, leaves = _three_epochs(world)
    settlement = world.contracts(OPERATOR).settlement
    world.contracts(GUARDIAN).settlement.veto(world.node, 2)
    doc = {"rewards": rewards_tree(leaves[3], world.node).to_json()}
    amend(world.contracts(GUARDIAN).settlement, world.node, doc)
    world.mine()
    world.sync()
    latest, roots, proof_root = _published(world)
    assert (latest, roots[2], roots[3], proof_root) == (1, None, None, None), "only epoch 1 is the chain's"
    assert roots[1] == to_hex(settlement.epoch(world.node, 1).rewards_root)

    adopt_amendment(world.factory, settlement, world.node, doc)
    latest, roots, proof_root = _published(world)
    assert latest == 2 and roots[2] == to_hex(settlement.epoch(world.node, 2).rewards_root), "the corrected tree"
    assert roots[3] is None and proof_root is None, "epoch 3's receipts are paid by the corrected tree"
