"""`loranode earnings` explains each epoch with the payouts that epoch was built with.

A dataset's owner may move its payout; an epoch pays the address the mirror held when it was built
(docs/settlement.md). The earnings replayed every settled epoch with the payouts the mirror holds now:
once a contributor moved its payout, the old address was told its dataset earnings were `unexplained`,
and the new one (here the adapter owner's own address) was told it had earned the dataset's share in
epochs that never paid it there, with a negative `unexplained` to make up the sum. Real anvil,
contracts, indexer and worker; SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any

import pytest

from node.db.models import EpochState
from node.settlement.earnings import earnings
from node.settlement.policy import EpochPolicy
from node.settlement.split import SplitParams
from tests.adversarial.settlement_steps import LONG, tick_until
from tests.fixtures.settlement import CONTRIBUTORS, NODE_BPS, OWNERS, PROTOCOL_BPS, SettlementWorld, address

pytestmark = pytest.mark.chain


def _sources(world: SettlementWorld, account: str) -> dict[int, dict[str, int]]:
    params = SplitParams(world.deployment.treasury, world.node, PROTOCOL_BPS, NODE_BPS)
    with world.factory() as session:
        report: dict[str, Any] = earnings(session, params, account)
    return {e["epochId"]: {s["source"]: int(s["amount"]) for s in e["sources"]} for e in report["epochs"]}


def test_an_epoch_is_explained_with_the_payouts_it_paid_after_a_payout_moves(settlement_world: SettlementWorld
                                                                            ) -> None:
    world = settlement_world
    service = world.service(EpochPolicy(max_age_s=0))
    adapter = world.adapter_ids[0]  # datasets 1 (60 %) and 2 (40 %), owner OWNERS[0]
    old, owner = address(world.key(CONTRIBUTORS[1])), address(world.key(OWNERS[0]))
    world.pay(0, 0, adapter, 7_000_003, validity_s=LONG)
    tick_until(world, service, 1, EpochState.FINAL)
    before_old, before_owner = _sources(world, old), _sources(world, owner)
    assert set(before_old[1]) == {"dataset 2"} and set(before_owner[1]) == {f"adapter {adapter} owner"}

    dataset = world.dataset_ids[adapter][1]
    world.contracts(CONTRIBUTORS[1]).datasets.update(dataset, "file:///d1", owner)  # its share goes to the owner
    world.mine(3)
    world.sync()
    world.pay(0, 0, adapter, 5_000_011, validity_s=LONG)
    tick_until(world, service, 2, EpochState.FINAL)

    assert _sources(world, old) == before_old  # epoch 1 paid the old address its dataset share, and only that
    by_owner = _sources(world, owner)
    assert by_owner[1] == before_owner[1]  # never the dataset's share of epoch 1, nor anything unexplained
    assert set(by_owner[2]) == {f"adapter {adapter} owner", f"dataset {dataset}"}  # epoch 2 paid it both
