"""The backlog /metrics reports from the database follows a real epoch: receipts pending and their
value while unsettled, the settle transaction pending and bumped while priced out, all back to zero
once the epoch is final; and the indexer's lag while it is behind the chain (a failed epoch:
tests/adversarial/test_settlement_liveness.py)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from node.api.metric_sources import BacklogReader, backlog_families
from node.chain.indexer import IndexedContracts, Indexer
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
    read = BacklogReader(world.factory, world.node)
    families = {f.name + ("_total" if f.type == "counter" else "") for f in backlog_families(read)}
    assert families <= set(documented()), families - set(documented())


def test_the_indexer_lag_is_the_blocks_it_is_behind_and_its_step_age_grows(sqlite_world: SettlementWorld) -> None:
    world = sqlite_world
    world.sync()
    with world.factory() as session:
        caught_up = read_backlog(session, world.node)
    assert caught_up.indexer_lag_blocks == 0 and caught_up.indexer_step_age_s is not None
    world.mine(6)
    one_block = replace(world.indexer.config, initial_range=1, min_range=1, max_range=1)  # a slow indexer
    contracts = IndexedContracts.from_deployment(world.deployment)
    Indexer(one_block, world.anvil.rpc_url, world.factory, contracts).run_once()
    with world.factory() as session:
        behind = read_backlog(session, world.node)
    assert behind.indexer_lag_blocks == 5
    world.sync()
    with world.factory() as session:
        again = read_backlog(session, world.node)
    assert again.indexer_lag_blocks == 0 and again.indexer_step_age_s is not None
