"""When an epoch closes: by age, by value, or before a voucher expires; and one epoch at a time."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest

from node.db.models import EpochState
from node.settlement.outbox import Pending
from node.settlement.policy import LANE_GAS, SETTLE_BASE_GAS, EpochPolicy, GasFloor
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
