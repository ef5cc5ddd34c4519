"""When an epoch closes: by age, by value, or before a voucher expires; and one epoch at a time."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest

from node.db.models import EpochState
from node.settlement import outbox
from node.settlement.outbox import Pending
from node.settlement.policy import LANE_GAS, SETTLE_BASE_GAS, EpochPolicy, GasFloor
from tests.adversarial.settlement_steps import LONG, empty_escrow
from tests.fixtures.settlement import SettlementWorld

pytestmark = pytest.mark.chain


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def test_an_epoch_closes_by_age_value_or_voucher_expiry(sqlite_world: SettlementWorld) -> None:
    world = sqlite_world
    a, _ = world.adapter_ids
    clock = Clock()
    by_age = world.service(EpochPolicy(max_age_s=600, expiry_margin_s=120), clock=clock)
    assert not by_age.is_due()  # nothing waits
    world.pay(0, 0, a, 1_000, validity_s=3_600)
    assert not by_age.is_due()
    clock.now += 601
    assert by_age.is_due()
    clock.now -= 601
    assert world.service(EpochPolicy(max_age_s=600, max_value=1_000), clock=clock).is_due()
    assert not world.service(EpochPolicy(max_age_s=600, max_value=1_001), clock=clock).is_due()
    world.pay(1, 0, a, 1_000, validity_s=400)  # expires within the margin soon
    clock.now += 290
    assert by_age.is_due()
    assert by_age.tick() is EpochState.BUILT  # closed and built in one beat
    world.pay(2, 0, a, 5, validity_s=400)  # outlives the build's horizon
    assert by_age.is_due() and by_age.close_epoch() is None  # epoch 1 is still in flight
    for _ in range(10):
        by_age.step()
        world.mine()
    assert by_age.state(1) is EpochState.FINAL
    assert by_age.tick() is EpochState.BUILT and by_age.state(2) is EpochState.BUILT


def test_a_lane_counts_once_its_fees_pay_for_its_gas_and_an_epoch_once_they_pay_for_the_settle() -> None:
    policy = EpochPolicy(max_age_s=0, token_per_eth=2 * 10**18)  # a token unit is worth half a wei
    floor = policy.gas_floor(10**9)
    assert (floor.lane, floor.base) == (2 * LANE_GAS * 10**9, 2 * SETTLE_BASE_GAS * 10**9)
    assert EpochPolicy().gas_floor(10**9) == GasFloor()  # no rate: every lane counts
    now = time.time()
    short = floor.base + 3 * floor.lane - 1
    assert not policy.is_due(Pending(3, short, 3, datetime.fromtimestamp(now - 10, UTC), 10**10, 3), now, floor)
    assert policy.is_due(Pending(3, short + 1, 3, datetime.fromtimestamp(now - 10, UTC), 10**10, 3), now, floor)


def test_an_epoch_is_due_only_when_the_lanes_it_would_take_pay_for_the_settle(sqlite_world: SettlementWorld) -> None:
    """A payer whose thaw ends before the settle lands is settled alone or waits (`at_risk_first`): its
    fees must not make the epoch due when the lanes the epoch then takes do not pay for the settle's gas
    (the old `is_due` counted them, and an epoch opened collecting less than its settle costs)."""
    world = sqlite_world
    a, _ = world.adapter_ids
    service = world.service(EpochPolicy(max_age_s=0, token_per_eth=10**18))  # 1 token unit = 1 wei
    floor = service.gas_floor()
    two_lanes = floor.base + 2 * floor.lane
    fee = two_lanes * 11 // 20  # each lane alone is below a settle of its own (base + lane), both above it
    assert floor.lane <= fee < floor.base + floor.lane <= 2 * fee
    world.pay(0, 0, a, fee, validity_s=LONG)
    world.pay(1, 0, a, fee, validity_s=LONG)
    empty_escrow(world, 1)  # payer 1 may withdraw before any settle lands: its lane waits, too small alone
    world.sync()
    assert not service.is_due()
    assert service.tick() is None and service.state(1) is None  # no epoch that collects less than it costs
    world.pay(0, 0, a, fee, validity_s=LONG)  # the honest lane now pays for a settle of its own
    assert service.is_due()
    assert service.tick() is EpochState.BUILT
    with world.factory() as session:
        row = outbox.epoch_row(session, world.node, 1)
        assert row is not None and row.collected_total == 2 * fee  # payer 0's lane alone


def test_lanes_due_first_that_do_not_pay_for_the_settle_never_hold_up_one_that_does(
        sqlite_world: SettlementWorld) -> None:
    """With `max_lanes` lanes due first (their vouchers expire soonest), each just worth its own gas, the
    epoch would collect less than its settle costs: the richest lanes are taken instead, the honest one
    among them (before, the epoch opened with the small lanes alone, at a loss to the node)."""
    world = sqlite_world
    a, _ = world.adapter_ids
    service = world.service(EpochPolicy(max_age_s=0, max_lanes=2, token_per_eth=10**18))
    floor = service.gas_floor()
    small = floor.lane * 11 // 10
    for lane in range(2):
        world.pay(0, lane, a, small, validity_s=LONG // 2)  # due first
    world.pay(1, 0, a, 2 * (floor.base + 2 * floor.lane), validity_s=LONG)
    assert service.is_due()
    assert service.tick() is EpochState.BUILT
    with world.factory() as session:
        row = outbox.epoch_row(session, world.node, 1)
        assert row is not None and row.collected_total == small + 2 * (floor.base + 2 * floor.lane)


def test_a_worker_whose_clock_runs_behind_the_chains_closes_the_epoch_before_a_voucher_expires(
        sqlite_world: SettlementWorld) -> None:
    """The contract compares a voucher's deadline with the block's timestamp: a worker whose own clock ran
    10 minutes behind the chain's read 700 s left on a voucher the chain gives 100 s (within the 120 s margin),
    kept the epoch open, and the voucher expired before it was settled (the node's loss)."""
    world = sqlite_world
    a, _ = world.adapter_ids
    world.anvil.rpc("evm_increaseTime", 600)  # the chain's clock: 600 s ahead of the worker's
    world.mine()
    world.pay(0, 0, a, 1_000, validity_s=100)
    service = world.service(EpochPolicy(max_age_s=3_600, expiry_margin_s=120), clock=Clock())
    assert service.is_due()
