"""Payees that are the node itself or the Settlement contract, set between a receipt and its epoch.

A dataset's owner may move its payout at any time (DatasetRegistry.update); lineage (dataset ids, weights,
owner share) is fixed at registration. Two contributors move theirs after a paid request and before the
epoch that pays it: one to the node's operator address, one to the Settlement contract. The epoch pays the
payouts as they are when it is built, by exactly DESIGN.md's split; the node's leaf is its node share, its
dust and the dataset share in one leaf (one address, one cumulative amount: two leaves would let it claim
only the larger); a share paid to the Settlement contract stays in its balance (its owner chose it) and
costs no other payee anything: every other leaf is claimed in full. Found nothing to fix; this pins it.
Real anvil, contracts, indexer, ledger, settlement and claims."""

from __future__ import annotations

from pathlib import Path

import pytest
from web3 import Web3

from node.db.models import EpochState
from node.settlement.claims import claim_all
from node.settlement.epoch_builder import cumulative_of
from node.settlement.policy import EpochPolicy
from node.settlement.publication import export_epoch, published_epoch
from node.settlement.split import Lineage, SplitParams, split_fee
from tests.adversarial.settlement_steps import LONG, tick_until
from tests.fixtures.settlement import CONTRIBUTORS, NODE_BPS, OPERATOR, PROTOCOL_BPS, RELAYER, SettlementWorld

pytestmark = [pytest.mark.chain, pytest.mark.slow]
FEE = 10**15 + 7  # an odd fee: every floor leaves dust


def test_payouts_moved_to_the_node_and_to_the_settlement_contract_are_paid_exactly(
        settlement_world: SettlementWorld, tmp_path: Path) -> None:
    world = settlement_world
    adapter = world.adapter_ids[0]  # datasets 1 and 2, 60/40, owner share 20 %
    world.pay(0, 0, adapter, FEE, validity_s=LONG)
    settlement = world.contracts(OPERATOR).settlement
    d1, d2 = world.dataset_ids[adapter]
    world.contracts(CONTRIBUTORS[0]).datasets.update(d1, "file:///d0", world.node)
    world.contracts(CONTRIBUTORS[1]).datasets.update(d2, "file:///d1", settlement.address)
    world.mine(2)
    world.sync()
    tick_until(world, world.service(EpochPolicy(max_age_s=0)), 1, EpochState.FINAL)

    registered = world.lineages[adapter]
    moved = Lineage(registered.owner, registered.owner_share_bps,
                    ((world.node, registered.datasets[0][1]), (settlement.address, registered.datasets[1][1])))
    params = SplitParams(world.deployment.treasury, world.node, PROTOCOL_BPS, NODE_BPS)
    expected = {Web3.to_checksum_address(a): v for a, v in split_fee(FEE, params, moved).items() if v}
    with world.factory() as session:
        row = published_epoch(session, world.node, 1)
        assert row is not None and row.trees is not None
        leaves = cumulative_of(row.trees["rewards"])
    assert leaves == expected and sum(leaves.values()) == FEE
    assert len(row.trees["rewards"]["values"]) == len(expected)  # one leaf per address

    relayer = world.contracts(RELAYER)
    outcome = claim_all(relayer, world.node, export_epoch(world.factory, world.node, tmp_path / "e1.json", 1))
    assert outcome.refused == {}
    for account, amount in expected.items():
        assert settlement.claimed(world.node, account) == amount
    token = world.contracts(OPERATOR).token
    assert token.balance_of(settlement.address) == expected[Web3.to_checksum_address(settlement.address)]
