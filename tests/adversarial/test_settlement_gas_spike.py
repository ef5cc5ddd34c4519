"""A gas price spike between an epoch's build and its send must not make the node settle at a loss.

With the token's worth in ETH set (`token_per_eth`), an epoch closes only once what it collects pays for
its settle's gas at the chain's gas price (tests/adversarial/test_settlement_dust_lanes.py). But the price
was judged once, when the epoch closed and was built; the settle was sent at the next tick at whatever
the price had become: a spike in between (a congested chain, or a payer spamming blocks on a cheap L2)
had the node pay many times what the epoch collected. Now an epoch not sent yet whose collection no
longer pays for its settle at the price of the moment is dissolved: its receipts wait (nothing lost: the
lanes' vouchers are cumulative), and close again once the price falls. Real anvil, contracts, indexer,
ledger and settlement."""

from __future__ import annotations

import pytest

from node.db.models import EpochState
from node.settlement import outbox
from node.settlement.policy import EpochPolicy
from tests.adversarial.settlement_steps import LONG, lost, payer, settles, tick_until
from tests.fixtures.settlement import OPERATOR, SettlementWorld

pytestmark = [pytest.mark.chain, pytest.mark.slow]
ETH = 10**18
SPIKE = 30


def test_a_gas_spike_after_the_build_sends_no_settle_that_costs_more_than_it_collects(
        settlement_world: SettlementWorld) -> None:
    world = settlement_world
    service = world.service(EpochPolicy(max_age_s=0, token_per_eth=ETH))  # 1 token unit = 1 wei
    floor = service.gas_floor()
    fee = 2 * (floor.base + floor.lane)  # pays for its settle twice over at today's price
    world.pay(0, 0, world.adapter_ids[0], fee, validity_s=LONG)
    first_block = world.w3.eth.block_number + 1
    assert service.tick() is EpochState.BUILT  # judged due, closed and built at today's price

    base_fee = int(world.w3.eth.get_block("latest")["baseFeePerGas"])
    world.anvil.rpc("anvil_setNextBlockBaseFeePerGas", hex(base_fee * SPIKE))
    world.mine()  # the chain's price is now some 30 times what the epoch was built at
    assert service.gas_floor().base > fee
    service.tick()
    sent = settles(world, first_block)
    spent = sum(wei for _, wei, _, _ in sent)
    assert spent <= world.contracts(OPERATOR).settlement.rewards_total(world.node), (
        f"the node paid {spent} wei of gas to collect {fee}")
    assert lost(world) == []  # nothing written off: the receipt waits
    with world.factory() as session:
        assert outbox.pending(session, world.node).num_receipts == 1

    world.anvil.rpc("anvil_setNextBlockBaseFeePerGas", hex(base_fee))
    world.mine()  # the spike is over: the receipt is collected
    tick_until(world, service, 1, EpochState.FINAL)  # epoch 1 again: the dissolved one was never sent
    assert world.contracts(OPERATOR).settlement.collected(payer(world, 0), world.node, 0) == fee
    assert sum(wei for _, wei, _, _ in settles(world, first_block)) <= fee
