"""Payers who front-run the node's settles cannot stop its settlement, nor make it burn a batch's gas.

A payer whose thaw has ended but who has not withdrawn yet passes the settle's preflight (the escrow
still holds its money); when the settle is broadcast, it withdraws first with a higher tip and the
settle reverts on chain, costing the node the gas spent up to that payer's voucher. The epoch is rebuilt
without that lane (the next preflight sees the escrow short) and sent again, and the next such payer
does the same. The node gave up after MAX_ATTEMPTS rebuilds of one epoch (it waited for an operator,
and with it every payee of the node); now a rebuild that leaves a lane out (a recorded loss) is progress
and does not count. Each payer can do it once per thaw (its lane is then a loss), so K payers cause K
reverted settles; but their lanes sat in one batch with every honest lane, collected in (payer, lane)
order: a payer whose address sorts last made each revert burn the gas of all the honest lanes before it
(923,253 gas with 15 honest lanes; some 10M with 200). Now the lanes of a payer whose thaw ends before
the settle lands are settled alone, in an epoch of their own (`outbox.at_risk_first`): a front-run
burns one settle of that payer's lanes, and never holds an honest lane in a reverted settle.
Real anvil, contracts, indexer, ledger and settlement.
"""

from __future__ import annotations

import pytest
from sqlalchemy import select

from node.db.loss import LossReason
from node.db.models import EpochState, SettlementEpoch
from node.settlement.policy import LANE_GAS, SETTLE_BASE_GAS, EpochPolicy
from node.settlement.recovery import MAX_ATTEMPTS
from node.settlement.settle_call import signed_vouchers
from tests.adversarial.settlement_steps import LONG, lost, settles, withdraw_with_a_high_tip
from tests.fixtures.settlement import FINALITY_DEPTH, OPERATOR, PAYERS, TOKEN, SettlementWorld, address, fund

pytestmark = [pytest.mark.chain, pytest.mark.slow]
FEE = 1_000


def payer_of(world: SettlementWorld, account: int) -> str:
    return address(world.key(account)).lower()


def sent_payers(world: SettlementWorld) -> set[str]:
    """The payers whose vouchers are in a settle sent and not mined yet."""
    with world.factory() as session:
        rows = session.scalars(select(SettlementEpoch).where(SettlementEpoch.state == EpochState.SUBMITTED))
        return {v.payer.lower() for row in rows for v in signed_vouchers(row.batch or {"vouchers": []})}


def front_run(world: SettlementWorld, attackers: tuple[int, ...], honest_lanes: int) -> list[tuple[int, int, bool]]:
    """Every payer of PAYERS pays FEE on `honest_lanes` lanes; each of `attackers` pays FEE on lane 0 and
    runs out its thaw, then withdraws ahead of the first settle that collects it. The node ticks until
    every honest lane is collected; (gas, vouchers, reverted) of each settle mined meanwhile."""
    a = world.adapter_ids[0]
    for attacker in attackers:
        fund(world, attacker)
    world.mine(FINALITY_DEPTH)
    world.sync()
    for p in range(len(PAYERS)):
        for lane in range(honest_lanes):
            world.pay(p, lane, a, FEE, validity_s=LONG)
    for attacker in attackers:
        world.pay_as(attacker, 0, a, FEE, validity_s=LONG)
        world.contracts(attacker).escrow.thaw(world.node, 1_000 * TOKEN)
    world.anvil.rpc("evm_increaseTime", world.contracts(OPERATOR).escrow.thaw_period_s() + 1)  # thaws run out
    world.mine()
    world.sync()
    service = world.service(EpochPolicy(max_age_s=0))
    first_block = world.w3.eth.block_number + 1
    withdrawn: list[int] = []
    for _ in range(30 * (len(attackers) + 1)):  # each tick's settle is mined in a block of its own
        world.anvil.rpc("evm_setAutomine", False)
        service.tick()
        in_batch = sent_payers(world)
        ahead = next((k for k in attackers if k not in withdrawn and payer_of(world, k) in in_batch), None)
        if ahead is not None:
            withdraw_with_a_high_tip(world, ahead)
            withdrawn.append(ahead)
        world.mine()
        world.anvil.rpc("evm_setAutomine", True)
        world.sync()
        if honest_collected(world, honest_lanes) and len(lost(world)) == len(attackers):
            break
    sent = [(gas, vouchers, reverted) for gas, _, vouchers, reverted in settles(world, first_block)]
    for gas, vouchers, reverted in sent:
        print(f"settle of {vouchers} voucher(s): {gas} gas{', reverted' if reverted else ''}")
    return sent


def honest_collected(world: SettlementWorld, honest_lanes: int) -> bool:
    settlement = world.contracts(OPERATOR).settlement
    return all(settlement.collected(world.contracts(PAYERS[p]).client.address, world.node, lane) == FEE
               for p in range(len(PAYERS)) for lane in range(honest_lanes))


def attackers_lost(world: SettlementWorld, attackers: tuple[int, ...]) -> bool:
    return sorted(lost(world)) == sorted((payer_of(world, k), 0, FEE, LossReason.ESCROW_SHORT) for k in attackers)


def test_payers_front_running_each_resend_of_a_settle_do_not_stop_it(settlement_world: SettlementWorld) -> None:
    attackers = tuple(range(12, 12 + MAX_ATTEMPTS))  # anvil accounts the fixture leaves unused
    sent = front_run(settlement_world, attackers, honest_lanes=1)
    assert honest_collected(settlement_world, 1)
    assert attackers_lost(settlement_world, attackers)
    assert sum(reverted for *_, reverted in sent) <= len(attackers)  # once per payer and thaw


def test_a_front_run_settle_burns_one_payers_lanes_not_the_batch(settlement_world: SettlementWorld) -> None:
    attackers = (12, 14, 18)  # their addresses sort after the honest payers': their vouchers came last
    sent = front_run(settlement_world, attackers, honest_lanes=5)
    assert honest_collected(settlement_world, 5)
    assert attackers_lost(settlement_world, attackers)
    reverted_gas = [gas for gas, _, reverted in sent if reverted]
    assert len(reverted_gas) <= len(attackers)  # once per payer and thaw
    assert max(reverted_gas, default=0) <= SETTLE_BASE_GAS + LANE_GAS, reverted_gas  # one payer's one lane
