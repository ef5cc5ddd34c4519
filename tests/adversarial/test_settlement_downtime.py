"""A day of receipts waiting when the settlement worker comes back: every lane it still can is collected, in
as few settles as the lane cap allows, the rest is recorded as lost, and the worker never stops.

While the worker was down, chain time moved a day (anvil evm_increaseTime): some lanes' vouchers expired,
one payer thawed its escrow (it may withdraw ahead of a settle: its lanes are settled alone, by design:
tests/adversarial/test_settlement_front_run.py), another thawed and withdrew everything. Lanes whose every
voucher had expired sorted first (soonest deadline) and took places in the first epoch the build then
wrote off: the honest lanes behind them needed one settle more than the cap allows. Now a lane no
voucher of which is valid when the settle lands takes no place: its receipts ride along with the epoch
and are recorded as lost there. Real anvil, contracts, indexer, ledger and settlement."""

from __future__ import annotations

import pytest

from node.db.loss import LossReason
from node.db.models import EpochState
from node.settlement import outbox
from node.settlement.policy import EpochPolicy
from node.settlement.service import SettlementService
from tests.adversarial.settlement_steps import lost, settles
from tests.fixtures.settlement import OPERATOR, PAYERS, TOKEN, SettlementWorld, address, fund

pytestmark = [pytest.mark.chain, pytest.mark.slow]
DAY = 86_400
CAP = 3  # vouchers per settle
FEE = TOKEN // 100
THAWED, WITHDRAWN = 12, 13  # anvil accounts with an escrow of their own
HONEST = [(PAYERS[0], lane) for lane in range(5)] + [(PAYERS[1], 3)]  # vouchers valid two days
EXPIRED = [(PAYERS[1], 0), (PAYERS[1], 1)]  # vouchers valid ten minutes


def test_a_day_of_receipts_is_collected_in_as_few_settles_as_the_cap_allows(settlement_world: SettlementWorld) -> None:
    world = settlement_world
    for account in (THAWED, WITHDRAWN):
        fund(world, account)
    world.mine(2)
    world.sync()
    for account, lane in EXPIRED:
        world.pay_as(account, lane, world.adapter_ids[0], FEE, validity_s=600)
    for account, lane in [*HONEST, (THAWED, 0), (THAWED, 1), (WITHDRAWN, 0)]:
        for _ in range(2):
            world.pay_as(account, lane, world.adapter_ids[1], FEE, validity_s=2 * DAY)
    for account in (THAWED, WITHDRAWN):
        world.contracts(account).escrow.thaw(world.node, 1_000 * TOKEN)

    world.anvil.rpc("evm_increaseTime", DAY)  # the worker is down for a day
    world.mine()
    world.contracts(WITHDRAWN).escrow.withdraw(world.node)
    world.mine(2)
    world.sync()

    first_block = world.w3.eth.block_number + 1
    service = world.service(EpochPolicy(max_age_s=0, max_lanes=CAP))  # the worker restarts
    _tick_until_every_receipt_is_final(world, service)

    settlement = world.contracts(OPERATOR).settlement
    for account, lane in [*HONEST, (THAWED, 0), (THAWED, 1)]:
        assert settlement.collected(address(world.key(account)), world.node, lane) == 2 * FEE, (account, lane)
    assert sorted((p, lane, reason) for p, lane, _, reason in lost(world)) == sorted(
        [(address(world.key(a)).lower(), lane, LossReason.VOUCHER_EXPIRED) for a, lane in EXPIRED]
        + [(address(world.key(WITHDRAWN)).lower(), 0, LossReason.ESCROW_SHORT)] * 2)
    sent = settles(world, first_block)
    assert not any(reverted for *_, reverted in sent)
    # the honest lanes in ceil(6 / CAP) settles, and the payer that may withdraw first in one of its own
    assert sorted(n for _, _, n, _ in sent) == [2, 3, 3], f"settles of {[n for _, _, n, _ in sent]} vouchers"


def test_a_settle_left_in_the_pool_that_reverts_after_the_day_stops_nothing(settlement_world: SettlementWorld) -> None:
    """The worker sent an epoch and went down before it was mined; it lands a day later, when one of its
    vouchers has expired, and reverts. On restart the epoch is rebuilt without that lane (a loss), and
    the lanes that waited meanwhile are collected."""
    world = settlement_world
    world.pay(0, 0, world.adapter_ids[0], FEE, validity_s=600)
    world.pay(0, 1, world.adapter_ids[0], FEE, validity_s=2 * DAY)
    service = world.service(EpochPolicy(max_age_s=0, max_lanes=CAP))
    world.anvil.rpc("evm_setAutomine", False)
    try:
        assert service.tick() is EpochState.BUILT
        assert service.tick() is EpochState.SUBMITTED  # in the pool; the worker goes down
        for lane in range(2, 6):  # the API went on taking payments
            world.pay(1, lane, world.adapter_ids[1], FEE, validity_s=2 * DAY)
        world.anvil.rpc("evm_increaseTime", DAY)
        first_block = world.w3.eth.block_number + 1
        world.mine()  # the settle lands a day late: lane 0's voucher has expired
    finally:
        world.anvil.rpc("evm_setAutomine", True)
    assert [reverted for *_, reverted in settles(world, first_block)] == [True], "the late settle reverted"
    world.sync()

    service = world.service(EpochPolicy(max_age_s=0, max_lanes=CAP))
    _tick_until_every_receipt_is_final(world, service)
    settlement = world.contracts(OPERATOR).settlement
    for account, lane in [(PAYERS[0], 1)] + [(PAYERS[1], lane) for lane in range(2, 6)]:
        assert settlement.collected(address(world.key(account)), world.node, lane) == FEE, (account, lane)
    assert [(p, lane, reason) for p, lane, _, reason in lost(world)] == [
        (address(world.key(PAYERS[0])).lower(), 0, LossReason.VOUCHER_EXPIRED)]


def _tick_until_every_receipt_is_final(world: SettlementWorld, service: SettlementService) -> None:
    """Tick (never raising), mine and index until no receipt waits and every epoch is final."""
    for _ in range(60):
        service.tick()
        world.mine()
        world.sync()
        with world.factory() as session:
            if (outbox.pending(session, world.node).num_receipts == 0
                    and all(r.state is EpochState.FINAL for r in outbox.in_flight(session, world.node))):
                return
    raise AssertionError("the worker did not get through the day's receipts")
