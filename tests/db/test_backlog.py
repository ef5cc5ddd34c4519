"""The backlog /metrics reports from the database follows a real epoch: receipts pending and their
value while unsettled, the settle transaction pending and bumped while priced out, all back to zero
once the epoch is final."""

from __future__ import annotations

import pytest

from node.api.metric_sources import backlog_families
from node.db.backlog import read_backlog
from node.db.models import EpochState
from tests.api.test_metrics import documented
from tests.fixtures.settlement import SettlementWorld
from tests.settlement.test_faults import FakeClock, pay_two, to_final

pytestmark = pytest.mark.chain


def test_settlement_and_tx_figures_follow_an_epoch_to_final(sqlite_world: SettlementWorld) -> None:
    world = sqlite_world
    fees = pay_two(world)
    with world.factory() as session:
        start = read_backlog(session, world.node)
    assert (start.num_pending_receipts, start.unsettled_value, start.num_unsettled_epochs) == (2, fees, 1)
    clock = FakeClock()
    service = world.service(clock=clock, bump_after_s=30, priority_fee=1, bump_percent=50)
    epoch_id = service.close_epoch()
    service.step()
    world.anvil.rpc("evm_setAutomine", False)
    assert service.step() is EpochState.SUBMITTED
    with world.factory() as session:
        sent = read_backlog(session, world.node)
    assert sent.num_pending_txs == 1 and sent.num_fee_bumps == 0
    key = f"settle:{world.node.lower()}:{epoch_id}"
    world.anvil.rpc("anvil_setNextBlockBaseFeePerGas", hex(service.tx.store.load(key).latest.max_fee_per_gas * 4))
    world.mine()
    clock.now += 31
    assert service.step() is EpochState.SUBMITTED  # priced out: bumped
    with world.factory() as session:
        assert read_backlog(session, world.node).num_fee_bumps >= 1
    world.anvil.rpc("evm_setAutomine", True)
    world.mine()
    to_final(world, service, epoch_id)
    with world.factory() as session:
        done = read_backlog(session, world.node)
    assert (done.num_pending_receipts, done.unsettled_value, done.num_unsettled_epochs, done.num_pending_txs) == (
        0, 0, 0, 0)
    assert done.num_fee_bumps >= 1
    families = {f.name + ("_total" if f.type == "counter" else "") for f in backlog_families(world.factory, world.node)}
    assert families <= set(documented()), families - set(documented())
