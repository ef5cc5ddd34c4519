"""Faults on a real anvil: the end state is the same as without them, and nothing is paid twice."""

from __future__ import annotations

import pytest
from sqlalchemy import delete

from node.db.loss import LossReason, losses
from node.db.models import EpochState, SettlementEpoch, TxIntent
from node.settlement.service import SettlementService
from tests.fixtures.settlement import OPERATOR, SettlementWorld

pytestmark = pytest.mark.chain


class Killed(BaseException):
    """The process dies here (not an Exception: nothing may catch it)."""


class FakeClock:
    def __init__(self) -> None:
        self.now = 2_000_000_000.0

    def __call__(self) -> float:
        return self.now


def pay_two(world: SettlementWorld) -> int:
    a, b = world.adapter_ids
    world.pay(0, 0, a, 3_000_001)
    world.pay(1, 2, b, 4_000_003)
    return sum(f for f, _ in world.fees)


def to_final(world: SettlementWorld, service: SettlementService, epoch_id: int) -> None:
    for _ in range(40):
        if service.step() in (EpochState.FINAL, EpochState.FAILED):
            break
        world.mine()
        world.sync()
    assert service.state(epoch_id) is EpochState.FINAL


def assert_settled_once(world: SettlementWorld, fees: int, nonce_before: int) -> None:
    settlement = world.contracts(OPERATOR).settlement
    assert settlement.last_epoch(world.node) == 1
    assert settlement.rewards_total(world.node) == fees
    assert world.contracts(OPERATOR).token.balance_of(settlement.address) == fees
    assert world.w3.eth.get_transaction_count(world.node) == nonce_before + 1  # one settle transaction


def test_worker_killed_after_broadcast_before_the_db_update(sqlite_world: SettlementWorld) -> None:
    world = sqlite_world
    fees, nonce = pay_two(world), world.w3.eth.get_transaction_count(world.node)
    service = world.service()
    epoch_id = service.close_epoch()
    assert service.step() is EpochState.BUILT
    real_save = service._save

    def dies_before_saving(epoch: int, state: EpochState, **kw: object) -> EpochState:
        if state is EpochState.SUBMITTED:
            raise Killed
        return real_save(epoch, state, **kw)  # type: ignore[arg-type]

    service._save = dies_before_saving  # type: ignore[method-assign]
    with pytest.raises(Killed):
        service.step()
    assert service.state(epoch_id) is EpochState.BUILT  # the DB never heard of the broadcast
    restarted = world.service()
    restarted.reconcile()
    to_final(world, restarted, epoch_id)
    assert_settled_once(world, fees, nonce)


def test_a_db_restored_from_before_the_broadcast_sees_the_epoch_on_chain(sqlite_world: SettlementWorld) -> None:
    world = sqlite_world
    fees, nonce = pay_two(world), world.w3.eth.get_transaction_count(world.node)
    service = world.service()
    epoch_id = service.close_epoch()
    to_final(world, service, epoch_id)
    with world.factory.begin() as session:  # what a backup taken at BUILT looks like
        session.execute(delete(TxIntent))
        row = session.query(SettlementEpoch).one()
        row.state, row.tx_hash, row.nonce = EpochState.BUILT, None, None
    to_final(world, world.service(), epoch_id)  # the repeated epoch would revert: counted as done
    assert_settled_once(world, fees, nonce)


def test_a_stuck_settle_is_bumped_and_mined_once(sqlite_world: SettlementWorld) -> None:
    world = sqlite_world
    fees, nonce = pay_two(world), world.w3.eth.get_transaction_count(world.node)
    clock = FakeClock()
    service = world.service(clock=clock, bump_after_s=30, priority_fee=1, bump_percent=50)
    epoch_id = service.close_epoch()
    service.step()
    world.anvil.rpc("evm_setAutomine", False)
    assert service.step() is EpochState.SUBMITTED
    first = service.tx.store.load(f"settle:{world.node.lower()}:{epoch_id}")
    world.anvil.rpc("anvil_setNextBlockBaseFeePerGas", hex(first.latest.max_fee_per_gas * 4))
    world.mine()
    assert service.step() is EpochState.SUBMITTED  # priced out: still pending
    while service.tx.store.load(first.key).latest.max_fee_per_gas <= first.latest.max_fee_per_gas * 8:
        clock.now += 31
        assert service.step() is EpochState.SUBMITTED
    record = service.tx.store.load(first.key)
    assert len({a.tx_hash for a in record.attempts}) == len(record.attempts) >= 2
    world.anvil.rpc("evm_setAutomine", True)
    world.mine()
    to_final(world, service, epoch_id)
    assert service.tx.store.load(first.key).mined_hash in {a.tx_hash for a in record.attempts[1:]}
    assert_settled_once(world, fees, nonce)


def test_a_settlement_reorged_away_is_sent_again(sqlite_world: SettlementWorld) -> None:
    world = sqlite_world
    fees, nonce = pay_two(world), world.w3.eth.get_transaction_count(world.node)
    settlement = world.contracts(OPERATOR).settlement
    service = world.service()
    epoch_id = service.close_epoch()
    service.step()
    snapshot = world.anvil.rpc("evm_snapshot")
    assert service.step() is EpochState.SUBMITTED
    assert service.step() is EpochState.CONFIRMED and settlement.last_epoch(world.node) == 1
    world.anvil.rpc("evm_revert", snapshot)  # the block holding the settle is gone
    world.anvil.rpc("evm_setAutomine", False)
    assert settlement.last_epoch(world.node) == 0
    assert service.step() is EpochState.SUBMITTED  # noticed, re-broadcast with the same nonce
    world.anvil.rpc("evm_setAutomine", True)
    to_final(world, service, epoch_id)
    assert_settled_once(world, fees, nonce)


def test_an_expired_voucher_is_a_recorded_loss_and_closing_goes_on(sqlite_world: SettlementWorld) -> None:
    world = sqlite_world
    a, _ = world.adapter_ids
    world.pay(0, 0, a, 1_000, validity_s=60)
    world.anvil.rpc("evm_increaseTime", 120)
    world.mine()
    service = world.service()
    assert service.close_epoch() == 1
    assert service.step() is None and service.state(1) is None  # nothing left to collect: dissolved
    with world.factory() as session:
        assert [(x.amount, x.reason) for x in losses(session, world.node)] == [(1_000, LossReason.VOUCHER_EXPIRED)]
    world.pay(1, 0, a, 2_000)
    epoch_id = service.close_epoch()
    assert epoch_id == 1  # the lost receipt stays out; the next payer is settled in its place
    to_final(world, service, epoch_id)
    assert world.contracts(OPERATOR).settlement.rewards_total(world.node) == 2_000
