"""Fee bumps after a settle's send must not make the node pay more gas than the epoch collects.

With the token's worth in ETH set (`token_per_eth`), an epoch is sent only while what it collects pays for
its settle's gas at the price of the moment (tests/adversarial/test_settlement_gas_spike.py). But once
sent, a settle the base fee outran was bumped 15% a step up to the TxManager's global `max_fee_cap`
(500 gwei): a spike after the send (a congested chain, or a payer filling blocks on a cheap L2) had the
node pay many times what the epoch collected. Now an epoch's bumps (and its first max fee) stop at what it
collects: past that the settle waits in the pool for the price to fall. An honest payer sees no change
while the price stays within what its lanes pay for: bumps still raise the settle that far, and it lands.
Real anvil, contracts, indexer, ledger and settlement."""

from __future__ import annotations

import pytest

from node.db.models import EpochState
from node.settlement.policy import EpochPolicy
from node.settlement.service import SettlementService
from tests.adversarial.settlement_steps import LONG, lost, payer, settles
from tests.fixtures.settlement import OPERATOR, SettlementWorld

pytestmark = [pytest.mark.chain, pytest.mark.slow]
ETH = 10**18


def _send_then_spike(world: SettlementWorld, service: SettlementService, spike: int, ticks: int) -> int:
    """Send the epoch's settle (not mined yet), then hold the base fee at `spike` times the gas price for
    `ticks` ticks of the worker, each followed by a block. Returns the base fee before the spike."""
    base_fee, gas_price = int(world.w3.eth.get_block("latest")["baseFeePerGas"]), int(world.w3.eth.gas_price)
    world.anvil.rpc("evm_setAutomine", False)
    try:
        assert service.tick() is EpochState.BUILT
        assert service.tick() is EpochState.SUBMITTED  # in the pool, priced for the base fee of the moment
        for _ in range(ticks):
            world.anvil.rpc("anvil_setNextBlockBaseFeePerGas", hex(gas_price * spike))
            world.mine()
            world.sync()
            service.tick()  # bumps the settle while the base fee outruns it
    finally:
        world.anvil.rpc("evm_setAutomine", True)
    return base_fee


def _collects(world: SettlementWorld, service: SettlementService, times: int) -> int:
    """One receipt on payer 0's lane whose fee pays for its settle `times` over at today's gas price."""
    floor = service.gas_floor()
    fee = times * (floor.base + floor.lane)
    world.pay(0, 0, world.adapter_ids[0], fee, validity_s=LONG)
    return fee


def test_bumps_after_the_send_never_pay_more_gas_than_the_epoch_collects(settlement_world: SettlementWorld) -> None:
    world = settlement_world
    service = world.service(EpochPolicy(max_age_s=0, token_per_eth=ETH), bump_after_s=0)  # 1 token unit = 1 wei
    fee = _collects(world, service, 2)
    first_block = world.w3.eth.block_number + 1
    base_fee = _send_then_spike(world, service, spike=30, ticks=30)

    spent = sum(wei for _, wei, _, _ in settles(world, first_block))
    assert spent <= fee, f"the node paid {spent} wei of gas to collect {fee}"
    assert lost(world) == []

    world.anvil.rpc("anvil_setNextBlockBaseFeePerGas", hex(base_fee))
    for _ in range(10):  # the spike is over: the settle waiting in the pool lands
        world.mine()
        world.sync()
        if service.tick() is EpochState.FINAL:
            break
    assert service.state(1) is EpochState.FINAL
    assert world.contracts(OPERATOR).settlement.collected(payer(world, 0), world.node, 0) == fee
    assert sum(wei for _, wei, _, _ in settles(world, first_block)) <= fee


def test_an_honest_lane_still_lands_through_a_spike_it_pays_for(settlement_world: SettlementWorld) -> None:
    world = settlement_world
    service = world.service(EpochPolicy(max_age_s=0, token_per_eth=ETH), bump_after_s=0)
    fee = _collects(world, service, 20)  # pays for its settle at up to some 20 times today's price
    first_block = world.w3.eth.block_number + 1
    _send_then_spike(world, service, spike=4, ticks=20)  # the bumps catch up with the spike: it lands

    assert world.contracts(OPERATOR).settlement.collected(payer(world, 0), world.node, 0) == fee
    sent = settles(world, first_block)
    assert len(sent) == 1 and not sent[0][3]
    assert sent[0][1] <= fee
