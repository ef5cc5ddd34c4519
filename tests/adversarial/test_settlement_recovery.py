"""A settlement loss is recovered by the lane's next valid voucher, and a loss that can never be
collected stops counting against the payer's escrow (issue #17, settlement losses).

Vouchers are cumulative per lane: the payer's next voucher on a lane signs `chargedTotal + maxFee`,
which includes what an earlier epoch lost, and the contract pays up to `cumulative - collected`. Real
anvil, real contracts, real databases.
"""

from __future__ import annotations

import pytest
from sqlalchemy import update

from node.db.loss import LossReason
from node.db.models import EpochState, Receipt, SettlementEpoch, Voucher
from node.settlement.epoch_builder import cumulative_of
from node.settlement.policy import EpochPolicy
from tests.adversarial.settlement_steps import (
    LONG,
    empty_escrow,
    leaves_total,
    lost,
    on_chain,
    payer,
    tick_until,
    withdraw_ahead_of_the_settle,
)
from tests.fixtures.settlement import PAYERS, TOKEN, SettlementWorld

pytestmark = pytest.mark.chain


def expire_and_settle(world: SettlementWorld, short: int, other: int) -> int:
    """Payer 0 pays `short` on lane 0 with a voucher that expires before the settle lands, payer 1
    pays `other`; one epoch settles payer 1 and loses payer 0's receipt. Returns the epoch id."""
    a, b = world.adapter_ids
    world.pay(0, 0, a, short, validity_s=600)
    world.pay(1, 0, b, other, validity_s=LONG)
    world.anvil.rpc("evm_increaseTime", 700)
    world.mine()
    service = world.service(EpochPolicy(land_within_s=1_000))
    epoch_id = service.close_epoch()
    assert epoch_id is not None
    tick_until(world, service, epoch_id, EpochState.FINAL)
    assert lost(world) == [(payer(world, 0), 0, short, LossReason.VOUCHER_EXPIRED)]
    return epoch_id


def settle_losses(env: dict[str, str], node: str) -> tuple[int, str]:
    """`loranode settle losses --node NODE`: (exit code, output)."""
    from typer.testing import CliRunner

    from node.cli import app

    result = CliRunner().invoke(app, ["settle", "losses", "--node", node], env=env)
    return result.exit_code, result.output


def receipts_in(world: SettlementWorld, epoch_id: int) -> int:
    with world.factory() as session:
        return int(session.query(SettlementEpoch).filter_by(epoch_id=epoch_id).one().receipt_count)


def test_a_lost_receipt_is_collected_with_the_lanes_next_valid_voucher(settlement_world: SettlementWorld) -> None:
    world = settlement_world
    a, _ = world.adapter_ids
    first = expire_and_settle(world, 1_000, 2_000)
    assert on_chain(world) == (1, 2_000, 2_000)
    world.pay(0, 0, a, 4_000, validity_s=LONG)  # signs cumulative 5_000: the lost 1_000 and this 4_000
    service = world.service(EpochPolicy(land_within_s=1_000))
    second = service.close_epoch()
    assert second == first + 1
    tick_until(world, service, second, EpochState.FINAL)
    assert on_chain(world) == (2, 7_000, 7_000)  # the lost receipt was collected with the new voucher
    assert leaves_total(world, second) == 7_000  # and split: sum of leaves == collected, to the wei
    assert receipts_in(world, second) == 2  # its receipt is in the epoch that collected it
    assert lost(world) == []  # nothing is still lost
    with world.factory() as session:
        row = session.query(SettlementEpoch).filter_by(epoch_id=second).one()
        assert cumulative_of(row.trees["rewards"]) == world.expected_split()  # every fee, split once


def test_a_recovery_the_chain_refuses_leaves_each_receipt_lost_once(settlement_world: SettlementWorld) -> None:
    world = settlement_world
    a, _ = world.adapter_ids
    expire_and_settle(world, 1_000, 2_000)
    world.pay(0, 0, a, 4_000, validity_s=LONG)
    empty_escrow(world, 0)
    world.contracts(PAYERS[0]).escrow.withdraw(world.node)  # the payer runs with what it owes
    world.pay(1, 0, a, 8_000, validity_s=LONG)
    service = world.service(EpochPolicy(land_within_s=1_000))
    second = service.close_epoch()
    tick_until(world, service, second, EpochState.FINAL)
    assert on_chain(world) == (2, 10_000, 10_000)
    assert sorted(lost(world)) == sorted([(payer(world, 0), 0, 1_000, LossReason.VOUCHER_EXPIRED),
                                          (payer(world, 0), 0, 4_000, LossReason.ESCROW_SHORT)])


def test_a_recovery_the_chain_refuses_after_its_preflight_is_rebuilt_and_each_receipt_lost_once(
        settlement_world: SettlementWorld) -> None:
    world = settlement_world
    a, b = world.adapter_ids
    expire_and_settle(world, 1_000, 2_000)
    world.pay(0, 0, a, 4_000, validity_s=LONG)
    world.pay(1, 0, b, 8_000, validity_s=LONG)
    empty_escrow(world, 0)
    service = world.service(EpochPolicy(max_age_s=0, land_within_s=1_000))
    second = service.close_epoch()
    assert service.tick() is EpochState.BUILT
    assert lost(world) == []  # the lost 1_000 is in the epoch: recovered, for now
    withdraw_ahead_of_the_settle(world, service, PAYERS[0])  # the payer front-runs the settle
    service.tick()
    assert service.state(second) is EpochState.FAILED
    tick_until(world, service, second, EpochState.FINAL)
    assert on_chain(world) == (2, 10_000, 10_000)
    assert leaves_total(world, second) == 10_000
    assert sorted(lost(world)) == sorted([(payer(world, 0), 0, 1_000, LossReason.VOUCHER_EXPIRED),
                                          (payer(world, 0), 0, 4_000, LossReason.ESCROW_SHORT)])


def test_a_recoverable_loss_still_counts_against_the_escrow_until_it_is_collected(
        settlement_world: SettlementWorld) -> None:
    world = settlement_world
    a, _ = world.adapter_ids
    expire_and_settle(world, 1_000, 2_000)
    world.sync()
    owed = world.ledger.channel(payer(world, 0), 7)
    assert owed.spendable == 1_000 * TOKEN - 1_000  # still owed: the lane's next voucher pays it
    world.pay(0, 0, a, 4_000, validity_s=LONG)
    service = world.service(EpochPolicy(land_within_s=1_000))
    tick_until(world, service, service.close_epoch() or 0, EpochState.FINAL)
    world.sync()
    assert world.ledger.channel(payer(world, 0), 7).spendable == 1_000 * TOKEN - 5_000
    assert world.contracts(PAYERS[0]).escrow.account(payer(world, 0), world.node).balance == 1_000 * TOKEN - 5_000


def test_a_loss_the_contract_refuses_for_good_stops_counting_against_the_escrow(
        settlement_world: SettlementWorld) -> None:
    world = settlement_world
    a, b = world.adapter_ids
    world.pay(0, 0, a, 1_000, validity_s=LONG)
    world.pay(1, 0, b, 2_000, validity_s=LONG)
    with world.factory.begin() as session:  # a voucher the contract refuses whatever the time or the escrow
        mine = session.query(Receipt).join(Voucher, Voucher.voucher_hash == Receipt.voucher_hash) \
            .filter(Voucher.payer == payer(world, 0)).one()
        session.execute(update(Voucher).where(Voucher.voucher_hash == mine.voucher_hash)
                        .values(signature="0x" + "11" * 65))
    service = world.service()
    epoch_id = service.close_epoch()
    tick_until(world, service, epoch_id or 0, EpochState.FINAL)
    assert [r[3] for r in lost(world)] == [LossReason.SETTLE_REFUSED]
    world.sync()
    assert world.ledger.channel(payer(world, 0), 0).spendable == 1_000 * TOKEN  # not locked by it
    world.pay(0, 1, a, 1_000, budget=1_000 * TOKEN - 1_000, validity_s=LONG)  # a quote of the whole escrow
    world.pay(0, 0, a, 4_000, validity_s=LONG)  # the lane goes on; the written-off 1_000 is never collected
    tick_until(world, service, service.close_epoch() or 0, EpochState.FINAL)
    assert on_chain(world) == (2, 7_000, 7_000)
    assert lost(world) == [(payer(world, 0), 0, 1_000, LossReason.SETTLE_REFUSED)]
    world.sync()
    assert world.ledger.channel(payer(world, 0), 0).spendable == 1_000 * TOKEN - 5_000


def test_settle_losses_shows_only_what_is_still_lost_and_what_was_recovered(sqlite_world: SettlementWorld) -> None:
    world = sqlite_world
    a, _ = world.adapter_ids
    expire_and_settle(world, 1_000, 2_000)
    env = {"LORANODE_DATABASE_URL": world.db_url}
    code, out = settle_losses(env, world.node)
    assert code == 0 and "total 1000 lost" in out and "recovered" not in out, out
    world.pay(0, 0, a, 4_000, validity_s=LONG)
    service = world.service(EpochPolicy(land_within_s=1_000))
    tick_until(world, service, service.close_epoch() or 0, EpochState.FINAL)
    code, out = settle_losses(env, world.node)
    assert code == 0 and "no losses" in out and "lost by" not in out, out
    assert "recovered 1000 in 1 record(s) (collected in epoch 2)" in out, out
