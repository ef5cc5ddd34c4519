"""An epoch end to end on anvil: several payers, lanes, adapters and datasets; collected == fees,
leaves == the split to the wei, every payee claims exactly its amount, once."""

from __future__ import annotations

import pytest
from web3 import Web3

from node.db.models import EpochState
from node.settlement.claims import claim, claim_all
from node.settlement.publication import export_epoch
from node.settlement.service import SettlementService
from tests.fixtures.settlement import OPERATOR, PAYERS, RELAYER, SettlementWorld

pytestmark = pytest.mark.chain


def settle(world: SettlementWorld, service: SettlementService) -> int:
    epoch_id = service.close_epoch()
    assert epoch_id is not None
    for _ in range(50):
        state = service.step()
        world.mine()
        world.sync()
        if state in (EpochState.FINAL, EpochState.FAILED):
            break
    assert service.state(epoch_id) is EpochState.FINAL
    return epoch_id


def pay_some(world: SettlementWorld, rounds: int) -> None:
    a, b = world.adapter_ids
    for r in range(rounds):
        world.pay(0, 0, a, 1_000_003 + r, budget=500)
        world.pay(0, 1, b, 777_777 + 13 * r)
        world.pay(1, 0, b, 999_999_937)
        world.pay(2, 5, a if r % 2 else b, 12_345 + r, budget=10)


def test_an_epoch_collects_every_fee_and_every_payee_claims_exactly(settlement_world: SettlementWorld,
                                                                    tmp_path) -> None:
    world = settlement_world
    token = world.contracts(OPERATOR).token
    settlement = world.contracts(OPERATOR).settlement
    service = world.service()
    pay_some(world, 3)
    escrow_before = token.balance_of(world.deployment.escrow)
    epoch_1 = settle(world, service)

    fees = sum(f for f, _ in world.fees)
    assert settlement.rewards_total(world.node) == fees
    assert escrow_before - token.balance_of(world.deployment.escrow) == fees
    assert token.balance_of(settlement.address) == fees
    for payer in range(len(PAYERS)):
        for lane in (0, 1, 5):
            charged = world.ledger.channel(world.contracts(PAYERS[payer]).client.address, lane).charged_total
            assert settlement.collected(world.contracts(PAYERS[payer]).client.address, world.node, lane) == charged

    # a second epoch: the tree is cumulative, rewardsTotal grows by exactly its fees
    pay_some(world, 2)
    epoch_2 = settle(world, service)
    assert epoch_2 == epoch_1 + 1
    expected = world.expected_split()
    assert sum(expected.values()) == sum(f for f, _ in world.fees) == settlement.rewards_total(world.node)

    with world.factory() as session:
        from node.settlement.publication import published_epoch

        row = published_epoch(session, world.node)
        leaves = {Web3.to_checksum_address(v["value"][0]): int(v["value"][1]) for v in row.trees["rewards"]["values"]}
    assert leaves == dict(expected)

    # one payee claims for itself via an export, a relayer claims for everyone else in bulk
    export = export_epoch(world.factory, world.node, tmp_path / "epoch.json")
    contributor = world.lineages[world.adapter_ids[0]].datasets[0][0]
    before = token.balance_of(contributor)
    assert claim(world.contracts(RELAYER), world.node, contributor, export) == expected[contributor]
    assert token.balance_of(contributor) - before == expected[contributor]
    balances = {a: token.balance_of(a) for a in expected}
    paid = claim_all(world.contracts(RELAYER), world.node, export).paid
    assert paid == {a: v for a, v in expected.items() if a != contributor}
    for account, amount in expected.items():
        due = 0 if account == contributor else amount
        assert token.balance_of(account) - balances[account] == due
    assert token.balance_of(settlement.address) == 0
    # nothing more to claim for anyone
    assert claim(world.contracts(RELAYER), world.node, contributor, export) == 0
    assert claim_all(world.contracts(RELAYER), world.node, export).paid == {}
