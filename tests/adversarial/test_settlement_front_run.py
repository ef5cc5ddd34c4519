"""Payers who front-run the node's settles one after another cannot stop the node's settlement.

A payer whose thaw has ended but who has not withdrawn yet passes the settle's preflight (the escrow
still holds its money); when the settle is broadcast, it withdraws first with a higher tip and the
settle reverts on chain. The epoch is rebuilt without that lane (the next preflight sees the escrow
short), sent again, and the next such payer does the same. The node gave up after MAX_ATTEMPTS
rebuilds of one epoch (it waited for an operator, and with it every payee of the node waited: no
epoch closes past a failed one), so MAX_ATTEMPTS payers with a thaw run out stopped everyone's
settlement. Now a rebuild that leaves a lane out (a recorded loss) is progress and does not count:
the epoch settles once every such lane is out. Real anvil, contracts, indexer, ledger and settlement.
"""

from __future__ import annotations

import pytest

from node.db.loss import LossReason
from node.db.models import EpochState
from node.settlement.policy import EpochPolicy
from node.settlement.recovery import MAX_ATTEMPTS
from node.settlement.service import SettlementService
from tests.adversarial.settlement_steps import LONG, lost, tick_until, withdraw_ahead_of_the_settle
from tests.fixtures.settlement import FINALITY_DEPTH, OPERATOR, PAYERS, TOKEN, SettlementWorld, address, fund

pytestmark = [pytest.mark.chain, pytest.mark.slow]
ATTACKERS = tuple(range(12, 12 + MAX_ATTEMPTS))  # anvil accounts the fixture leaves unused
FEE = 1_000


def front_run_the_next_settle(world: SettlementWorld, service: SettlementService, epoch_id: int,
                              attacker: int) -> None:
    """Tick until the epoch is sent again, then `attacker` withdraws ahead of it in the same block."""
    for _ in range(10):
        if service.state(epoch_id) is EpochState.BUILT:
            break
        service.tick()
    withdraw_ahead_of_the_settle(world, service, attacker)
    service.tick()
    assert service.state(epoch_id) is EpochState.FAILED  # the settle reverted on chain


def test_payers_front_running_each_resend_of_a_settle_do_not_stop_it(settlement_world: SettlementWorld) -> None:
    world = settlement_world
    a = world.adapter_ids[0]
    for attacker in ATTACKERS:
        fund(world, attacker)
    world.mine(FINALITY_DEPTH)
    world.sync()
    world.pay(0, 0, a, 5 * FEE, validity_s=LONG)  # an honest payer in the same epoch
    for attacker in ATTACKERS:
        world.pay_as(attacker, 0, a, FEE, validity_s=LONG)
        world.contracts(attacker).escrow.thaw(world.node, 1_000 * TOKEN)
    world.anvil.rpc("evm_increaseTime", world.contracts(OPERATOR).escrow.thaw_period_s() + 1)  # thaws run out
    world.mine()
    world.sync()
    service = world.service(EpochPolicy(max_age_s=10**9))
    epoch_id = service.close_epoch()
    assert epoch_id is not None
    for attacker in ATTACKERS:
        front_run_the_next_settle(world, service, epoch_id, attacker)
    tick_until(world, service, epoch_id, EpochState.FINAL)
    settlement = world.contracts(OPERATOR).settlement
    honest = world.contracts(PAYERS[0]).client.address
    assert settlement.collected(honest, world.node, 0) == 5 * FEE
    assert sorted(lost(world)) == sorted((address(world.key(k)).lower(), 0, FEE, LossReason.ESCROW_SHORT)
                                         for k in ATTACKERS)
