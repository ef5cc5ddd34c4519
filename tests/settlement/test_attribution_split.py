"""Method 2 receipts settle by their own weights: an epoch mixing lineage and evidence receipts pays
each contributor by the weights each receipt committed to, sum of leaves == collected to the wei,
and a receipt whose stored weights do not hash to its lineageHash is a recorded loss, out of the split,
while every other receipt settles."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import select
from web3 import Web3

from node.db.loss import LossReason, losses
from node.db.models import Receipt
from node.settlement.claims import claim_all
from node.settlement.publication import export_epoch, published_epoch
from node.settlement.split import SplitParams, split_fee
from tests.fixtures.settlement import NODE_BPS, OPERATOR, PROTOCOL_BPS, RELAYER, SettlementWorld
from tests.settlement.test_settlement_e2e import settle

pytestmark = pytest.mark.chain


def test_a_method_2_epoch_pays_each_contributor_by_the_receipts_weights(settlement_world: SettlementWorld,
                                                                         tmp_path: Path) -> None:
    world = settlement_world
    a, b = world.adapter_ids  # a: datasets 0, 1 at 60/40 %; b: datasets 1, 2 at 33.33/66.67 %
    world.pay(0, 0, a, 1_000_003)  # method 1: the lineage weights
    world.pay(0, 1, a, 999_999_937, weights=(10_000, 0))  # all of the dataset share to dataset 0
    world.pay(1, 0, a, 777_777, weights=(2_500, 7_500))
    world.pay(2, 0, b, 123_457, weights=(9_999, 1))
    service = world.service()
    settle(world, service)

    expected = world.expected_split()
    collected = sum(f for f, _ in world.fees)
    assert sum(expected.values()) == collected == world.contracts(OPERATOR).settlement.rewards_total(world.node)
    with world.factory() as session:
        row = published_epoch(session, world.node)
        leaves = {Web3.to_checksum_address(v["value"][0]): int(v["value"][1]) for v in row.trees["rewards"]["values"]}
    assert leaves == dict(expected)
    # the evidence moved money: against a lineage-only split, dataset 0 (all of the big fee) earned more
    params = SplitParams(world.deployment.treasury, world.node, PROTOCOL_BPS, NODE_BPS)
    lineage_only: Counter[str] = Counter()
    for fee, adapter_id in world.fees:
        lineage_only.update(split_fee(fee, params, world.lineages[adapter_id]))
    first = Web3.to_checksum_address(world.lineages[a].datasets[0][0])
    assert expected[first] > lineage_only[world.lineages[a].datasets[0][0]] + 100_000_000

    token = world.contracts(OPERATOR).token
    export = export_epoch(world.factory, world.node, tmp_path / "epoch.json")
    balances = {acct: token.balance_of(acct) for acct in expected}
    claim_all(world.contracts(RELAYER), world.node, export)
    for acct, amount in expected.items():
        assert token.balance_of(acct) - balances[acct] == amount


def test_stored_weights_that_do_not_match_the_lineage_hash_are_a_loss_and_the_rest_settles(
        settlement_world: SettlementWorld) -> None:
    world = settlement_world
    a = world.adapter_ids[0]
    tampered = world.pay(0, 0, a, 5_000_000, weights=(7_000, 3_000))
    world.pay(1, 0, a, 3_000_000, weights=(7_000, 3_000))
    with world.factory() as session, session.begin():  # the stored weights altered after signing
        row = session.scalars(select(Receipt).where(Receipt.receipt_hash == tampered)).one()
        row.attribution = {**row.attribution, "weightsBps": [3_000, 7_000]}
        voucher_hash = row.voucher_hash
    settle(world, world.service())
    settlement = world.contracts(OPERATOR).settlement
    assert settlement.rewards_total(world.node) == 3_000_000  # the honest receipt only
    with world.factory() as session:
        lost = losses(session, world.node)
    assert [(x.voucher_hash, x.reason, x.amount) for x in lost] == [(voucher_hash, LossReason.LINEAGE_MISMATCH,
                                                                     5_000_000)]
