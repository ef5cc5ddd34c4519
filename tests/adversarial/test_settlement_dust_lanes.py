"""Lanes whose fees do not pay for their own gas must not make the node settle at a loss.

Lanes are free to open, and `min_fee` may be 0: a payer opens many lanes with a request of 1 wei each.
`settle` collects one voucher per lane, about 53k gas each on top of some 200k per settle
(bench/results/contract_gas.json), paid by the node in ETH; the node collected 1 wei per lane for it,
and those lanes, due first (their vouchers expire soonest), filled the epoch (`epoch_max_lanes`) while
an honest lane waited for the next one. Now, with the token's worth in ETH set (`token_per_eth`), a lane
is settled only once its waiting fees cover its gas at the chain's gas price, and an epoch closes only
once what it collects covers the settle's own gas too: a dust lane waits (nothing is lost: the lane's
next voucher covers it, since vouchers are cumulative), and is collected once it is worth it.
Real anvil, contracts, indexer, ledger and settlement."""

from __future__ import annotations

import pytest

from node.db.models import EpochState
from node.settlement import outbox
from node.settlement.policy import EpochPolicy
from tests.adversarial.settlement_steps import LONG, lost, payer, settles, tick_until
from tests.fixtures.settlement import OPERATOR, SettlementWorld

pytestmark = [pytest.mark.chain, pytest.mark.slow]
DUST_LANES = 40
HONEST_FEE = 10**15  # a request's fee at the default prices: some 1,000 tokens of 10**12
ETH = 10**18


def test_dust_lanes_cost_the_node_no_gas_and_hold_up_no_honest_lane(settlement_world: SettlementWorld) -> None:
    world = settlement_world
    a = world.adapter_ids[0]
    for lane in range(DUST_LANES):  # due first: their vouchers expire soonest
        world.pay(0, lane, a, 1)
    world.pay(1, 0, a, HONEST_FEE, validity_s=LONG)
    service = world.service(EpochPolicy(max_age_s=0, max_lanes=10, token_per_eth=ETH))  # 1 token = 1 ETH
    first_block = world.w3.eth.block_number + 1
    tick_until(world, service, 1, EpochState.FINAL)
    settlement = world.contracts(OPERATOR).settlement
    sent = settles(world, first_block)
    for gas, _, vouchers, _ in sent:
        print(f"settle of {vouchers} voucher(s): {gas} gas")
    spent = sum(wei for _, wei, _, _ in sent)  # at 1 token per ETH, wei of gas are token units
    collected = settlement.rewards_total(world.node)
    print(f"node paid {spent} wei of gas, collected {collected}")
    assert spent <= collected, f"the node paid {spent} in gas to collect {collected}"
    assert settlement.collected(payer(world, 1), world.node, 0) == HONEST_FEE  # not held up
    assert lost(world) == []  # the dust waits: nothing is written off
    with world.factory() as session:
        assert outbox.pending(session, world.node).num_receipts == DUST_LANES

    world.pay(0, 0, a, HONEST_FEE)  # dust lane 0 grows worth its gas: collected, its first wei included
    tick_until(world, service, 2, EpochState.FINAL)
    assert settlement.collected(payer(world, 0), world.node, 0) == HONEST_FEE + 1
    assert sum(wei for _, wei, _, _ in settles(world, first_block)) <= settlement.rewards_total(world.node)
