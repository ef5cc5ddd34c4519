"""An epoch capped at `epoch_max_lanes` takes first the lanes whose money can be collected the shortest
time more, not the lanes that waited longest.

`settle` collects one voucher per lane, and an epoch takes at most `max_lanes` lanes (a batch no block
can hold would stop every payee); the others wait for the next epoch, one round trip later. The attack:
a payer pays on a lane behind `max_lanes` older lanes (its own dust lanes, or a busy node's) with a
voucher of the shortest validity the node accepts, or thaws its escrow right after being served. The
epoch took the older lanes, which had hours left, and left the payer's lane for a later one: by then
its voucher could no longer land (a VOUCHER_EXPIRED loss, the payer served for free), or its thaw had
ended and it withdrew (ESCROW_SHORT). Now an epoch takes its lanes by the time their money stays
collectable: the soonest deadline of their vouchers, or the end of the payer's thaw when sooner.
Real anvil, contracts, indexer, ledger and settlement.
"""

from __future__ import annotations

import pytest

from node.db.models import EpochState
from node.settlement.latency import SettleLatency
from node.settlement.policy import EpochPolicy
from node.settlement.service import SettlementService
from tests.adversarial.settlement_steps import LONG, lost, on_chain
from tests.fixtures.settlement import FINALITY_DEPTH, PAYERS, TOKEN, SettlementWorld

pytestmark = pytest.mark.chain
FEE = 1_000
ROUND_TRIP_S = 150  # chain time from one epoch's close to the next one's (one mine and one beat: 135 s)
# closes only when asked; an epoch is due when a voucher has less than the worst-case latency to live
POLICY = EpochPolicy(max_age_s=10**9, max_lanes=2, expiry_margin_s=SettleLatency().worst_case_s)


def settle_next(world: SettlementWorld, service: SettlementService) -> None:
    """Close an epoch now and step it (and nothing else) until it is final."""
    epoch_id = service.close_epoch()
    assert epoch_id is not None
    step_until_final(world, service, epoch_id)


def step_until_final(world: SettlementWorld, service: SettlementService, epoch_id: int) -> None:
    """Step the service (mining a block between steps) until it has nothing to do and `epoch_id` is final."""
    for _ in range(30):
        if service.step() is None and service.state(epoch_id) in (EpochState.FINAL, None):
            return
        world.mine()
        world.sync()
    raise AssertionError(f"epoch {epoch_id} is {service.state(epoch_id)}, not final")


def pay_behind_two_older_lanes(world: SettlementWorld, validity_s: int) -> None:
    a = world.adapter_ids[0]
    world.pay(0, 0, a, FEE, validity_s=LONG)
    world.pay(0, 1, a, FEE, validity_s=LONG)
    world.pay(1, 0, a, 3 * FEE, validity_s=validity_s)


def withdraw_at_thaw_end_then_settle(world: SettlementWorld, service: SettlementService, key: int) -> None:
    """Anvil account `key` withdraws as soon as its thaw ends, then the next epoch settles: nothing was
    lost, each payee lane paid its 5 fees (the epoch before took the thawing payer's lane in time)."""
    escrow = world.contracts(key).escrow
    world.anvil.rpc("evm_increaseTime", escrow.thaw_period_s() + 1)
    world.mine()
    escrow.withdraw(world.node)
    world.mine()
    world.sync()
    settle_next(world, service)
    assert lost(world) == []
    assert on_chain(world)[1:] == (5 * FEE, 5 * FEE)


def test_the_lane_whose_voucher_expires_first_is_in_the_epoch_its_expiry_made_due(
        settlement_world: SettlementWorld) -> None:
    world = settlement_world
    short = int(SettleLatency().worst_case_s) - 30  # more than an epoch needs to land, less than two
    pay_behind_two_older_lanes(world, validity_s=short)
    service = world.service(POLICY)
    assert service.is_due()  # the short voucher makes the epoch due
    settle_next(world, service)
    world.anvil.rpc("evm_increaseTime", ROUND_TRIP_S)
    world.mine()
    settle_next(world, service)
    assert lost(world) == []
    assert on_chain(world)[1:] == (5 * FEE, 5 * FEE)


def test_the_lane_of_a_thawing_payer_is_collected_before_its_thaw_ends(settlement_world: SettlementWorld) -> None:
    world = settlement_world
    pay_behind_two_older_lanes(world, validity_s=LONG)
    escrow = world.contracts(PAYERS[1]).escrow
    escrow.thaw(world.node, 1_000 * TOKEN)  # right after being served: its thaw ends before any voucher does
    world.mine()
    world.sync()
    service = world.service(POLICY)
    settle_next(world, service)
    withdraw_at_thaw_end_then_settle(world, service, PAYERS[1])


def test_a_thaw_cancel_not_final_yet_does_not_move_the_thawing_payers_lane_back(
        settlement_world: SettlementWorld) -> None:
    """The same payer cancels its thaw before the epoch closes, in a block a reorg then drops: the epoch
    must still have taken its lane by the thaw's end as of the last final block."""
    world = settlement_world
    pay_behind_two_older_lanes(world, validity_s=LONG)
    escrow = world.contracts(PAYERS[1]).escrow
    escrow.thaw(world.node, 1_000 * TOKEN)
    world.mine(FINALITY_DEPTH)
    world.sync()  # the thaw is final
    cancel_block = int(escrow.thaw(world.node, 0)["blockNumber"])
    world.sync()  # the cancel is mirrored, not final
    service = world.service(POLICY)
    epoch_id = service.close_epoch()  # takes its two lanes now
    world.anvil.rpc("anvil_reorg", world.w3.eth.block_number - cancel_block + 1, [])  # drops the cancel
    world.sync()
    assert epoch_id is not None
    step_until_final(world, service, epoch_id)
    withdraw_at_thaw_end_then_settle(world, service, PAYERS[1])
