"""Many lanes in one epoch must not stop the node's settlement.

Lanes are free to open: one paid request each, at the node's smallest fee. `settle` collects one
voucher per (payer, lane), about 53k gas each (bench/results/contract_gas.json), in one transaction.
Some 600 lanes in an epoch (one payer's, or just a busy node's) made a settle no block can hold (30M gas
on anvil, as on mainnet): the preflight ran out of gas on every step and every payee of the node
waited forever. Now an epoch takes at most `epoch_max_lanes` lanes and the rest wait for the next one.
Real anvil, contracts, indexer, ledger and settlement."""

from __future__ import annotations

import pytest

from node.db.models import EpochState
from node.settlement.policy import EpochPolicy
from tests.fixtures.settlement import OPERATOR, PAYERS, SettlementWorld

pytestmark = [pytest.mark.chain, pytest.mark.slow]
NUM_LANES = 700
FEE = 1_000


def test_an_epoch_of_many_lanes_settles_and_collects_every_lane(sqlite_world: SettlementWorld) -> None:
    world = sqlite_world
    a = world.adapter_ids[0]
    for lane in range(NUM_LANES):
        world.pay(0, lane, a, FEE)
    world.pay(1, 0, a, 5 * FEE)  # an honest payer in the same epochs
    service = world.service()
    states = []
    for _ in range(20):
        if service.close_epoch() is None and service.step() is None:
            break
        for _ in range(30):
            state = service.step()
            world.mine()
            world.sync()
            if state in (EpochState.FINAL, EpochState.FAILED, None):
                break
        states.append(state)
    settlement = world.contracts(OPERATOR).settlement
    assert EpochState.FAILED not in states, states
    assert settlement.last_epoch(world.node) >= -(-(NUM_LANES + 1) // EpochPolicy().max_lanes)  # lanes capped
    assert settlement.rewards_total(world.node) == NUM_LANES * FEE + 5 * FEE
    honest = world.contracts(PAYERS[1]).client.address
    assert settlement.collected(honest, world.node, 0) == 5 * FEE
