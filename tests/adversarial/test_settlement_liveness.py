"""No payer can stop or delay another payer's settlement (issue #17, attacks 3 and 4's settle part).

Real anvil, real contracts, real databases: epochs pipeline while the previous awaits finality, a
lane collects the best voucher that will still be valid when the settle lands, a lane that would
revert becomes a recorded loss, a failed epoch recovers by itself, and the node refuses to run where
the chain's thaw period lets a payer withdraw what it was charged.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from node.chain.deploy import write_deployment
from node.chain.tx_manager import FeePolicy, TxManager
from node.chain.tx_store import SqlTxStore
from node.config import load_settings
from node.db.backlog import read_backlog
from node.db.loss import LossReason
from node.db.models import EpochState, SettlementEpoch
from node.errors import ConfigError
from node.settlement.epoch_builder import cumulative_of
from node.settlement.policy import EpochPolicy
from node.settlement.runtime import SettlementRuntime
from node.settlement.service import SettlementService
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
from tests.fixtures.settlement import OPERATOR, PAYERS, SettlementWorld

pytestmark = pytest.mark.chain


def deep_finality_service(world: SettlementWorld, policy: EpochPolicy = EpochPolicy(max_age_s=0)) -> SettlementService:
    """A service whose settles need 64 confirmations to be final, as in production; closes on every tick."""
    tx = TxManager(world.w3, world.key(OPERATOR), SqlTxStore(world.factory), FeePolicy(confirmations=64))
    return SettlementService(world.factory, world.contracts(OPERATOR), tx, policy)


def test_the_next_epoch_is_settled_while_the_previous_awaits_finality(settlement_world: SettlementWorld) -> None:
    world = settlement_world
    a, b = world.adapter_ids
    service = deep_finality_service(world)
    world.pay(0, 0, a, 3_000_001)
    first = service.close_epoch()
    tick_until(world, service, first, EpochState.CONFIRMED, mine=False)
    world.pay(1, 0, b, 4_000_003)
    world.pay(0, 0, a, 5_000_007)
    tick_until(world, service, first + 1, EpochState.CONFIRMED, mine=False)
    assert service.state(first) is EpochState.CONFIRMED  # not final yet: epoch 2 did not wait for it
    assert on_chain(world) == (2, 12_000_011, 12_000_011)
    assert leaves_total(world, 2) == 12_000_011  # epoch 2's tree builds on epoch 1's
    world.mine(64)
    world.sync()
    tick_until(world, service, first + 1, EpochState.FINAL)
    assert service.state(first) is EpochState.FINAL
    with world.factory() as session:
        row = session.query(SettlementEpoch).filter_by(epoch_id=2).one()
        assert cumulative_of(row.trees["rewards"]) == world.expected_split()


def test_a_reorg_under_two_pipelined_epochs_sends_both_again_in_order(settlement_world: SettlementWorld) -> None:
    world = settlement_world
    a, b = world.adapter_ids
    service = deep_finality_service(world)
    nonce = world.w3.eth.get_transaction_count(world.node)
    world.pay(0, 0, a, 1_000)
    first = service.close_epoch()
    snapshot = world.anvil.rpc("evm_snapshot")
    tick_until(world, service, first, EpochState.CONFIRMED, mine=False)
    world.pay(1, 0, b, 2_000)
    tick_until(world, service, first + 1, EpochState.CONFIRMED, mine=False)
    world.anvil.rpc("evm_revert", snapshot)  # both settles are gone
    world.anvil.rpc("evm_setAutomine", False)
    assert on_chain(world)[0] == 0
    service.tick()
    assert (service.state(first), service.state(first + 1)) == (EpochState.SUBMITTED, EpochState.SUBMITTED)
    world.anvil.rpc("evm_setAutomine", True)
    world.mine(65)
    tick_until(world, service, first + 1, EpochState.FINAL)
    assert on_chain(world) == (2, 3_000, 3_000)
    assert world.w3.eth.get_transaction_count(world.node) == nonce + 2  # nonces kept the order


def test_a_lane_collects_its_best_voucher_still_valid_when_the_settle_lands(
        settlement_world: SettlementWorld) -> None:
    world = settlement_world
    a, b = world.adapter_ids
    world.pay(0, 0, a, 1_000, validity_s=LONG)
    world.pay(0, 0, b, 2_000, validity_s=LONG)
    world.pay(0, 0, a, 4_000, validity_s=600)  # the lane's last voucher: expired when the epoch builds
    world.pay(1, 0, a, 8_000, validity_s=LONG)
    world.pay(2, 3, b, 16_000, validity_s=1_500)  # still valid at build, but not when the settle lands
    world.anvil.rpc("evm_increaseTime", 700)
    world.mine()
    service = world.service(EpochPolicy(land_within_s=1_000))
    epoch_id = service.close_epoch()
    tick_until(world, service, epoch_id, EpochState.FINAL)
    assert on_chain(world) == (1, 11_000, 11_000)
    assert leaves_total(world, epoch_id) == 11_000  # the split covers what was collected, to the wei
    assert sorted(lost(world)) == sorted([(payer(world, 0), 0, 4_000, LossReason.VOUCHER_EXPIRED),
                                          (payer(world, 2), 3, 16_000, LossReason.VOUCHER_EXPIRED)])


def test_a_payer_short_of_escrow_is_a_loss_and_every_other_payer_is_collected(
        settlement_world: SettlementWorld) -> None:
    world = settlement_world
    a, b = world.adapter_ids
    world.pay(0, 0, a, 1_000, validity_s=LONG)
    world.pay(1, 0, b, 2_000, validity_s=LONG)
    world.pay(2, 1, a, 4_000, validity_s=LONG)
    empty_escrow(world, 0)
    world.contracts(PAYERS[0]).escrow.withdraw(world.node)  # the node was too slow: the money is gone
    service = world.service()
    epoch_id = service.close_epoch()
    tick_until(world, service, epoch_id, EpochState.FINAL)
    assert on_chain(world) == (1, 6_000, 6_000)
    assert leaves_total(world, epoch_id) == 6_000
    assert lost(world) == [(payer(world, 0), 0, 1_000, LossReason.ESCROW_SHORT)]


def _failed_epochs(world: SettlementWorld) -> int:
    with world.factory() as session:
        return read_backlog(session, world.node).num_failed_epochs


def test_an_epoch_the_chain_refuses_after_its_preflight_recovers_by_itself(
        settlement_world: SettlementWorld) -> None:
    world = settlement_world
    a, b = world.adapter_ids
    world.pay(0, 0, a, 1_000, validity_s=LONG)
    world.pay(1, 0, b, 2_000, validity_s=LONG)
    empty_escrow(world, 0)
    service = world.service(EpochPolicy(max_age_s=0))
    epoch_id = service.close_epoch()
    assert service.tick() is EpochState.BUILT
    withdraw_ahead_of_the_settle(world, service, PAYERS[0])  # the payer front-runs the settle
    assert on_chain(world)[0] == 0
    service.tick()
    assert service.state(epoch_id) is EpochState.FAILED  # the chain refused it
    assert _failed_epochs(world) == 1  # what loranode_settlement_failed_epochs shows the operator
    world.pay(2, 0, a, 4_000, validity_s=LONG)  # later payers are not held up either
    tick_until(world, service, epoch_id, EpochState.FINAL)
    tick_until(world, service, epoch_id + 1, EpochState.FINAL)
    assert _failed_epochs(world) == 0
    assert on_chain(world) == (2, 6_000, 6_000)
    assert lost(world) == [(payer(world, 0), 0, 1_000, LossReason.ESCROW_SHORT)]


def test_settings_refuse_a_voucher_validity_shorter_than_the_settle_latency() -> None:
    with pytest.raises(ConfigError, match="worst-case settle latency"):
        load_settings(min_voucher_validity_s=300)  # the validity the attack used
    with pytest.raises(ConfigError, match="worst-case settle latency"):
        load_settings(settle_max_mine_s=600)  # slower mining needs longer vouchers
    latency = load_settings().settle_latency()
    assert load_settings().min_voucher_validity_s >= latency.worst_case_s + load_settings().reservation_ttl_s


def test_an_x402_node_needs_vouchers_that_outlive_its_sweep() -> None:
    """An epoch with x402 lanes is sent only after the guard's claim in flight and its own claim and sweep
    are mined, each seen by a tick: every voucher of that epoch (lane payers' too) waits for them."""
    router = "0x" + "11" * 20
    lanes_only = load_settings(min_voucher_validity_s=1_100, epoch_expiry_margin_s=600)  # 600 s hold + 429 s
    with pytest.raises(ConfigError, match="worst-case settle latency"):
        load_settings(min_voucher_validity_s=1_100, epoch_expiry_margin_s=600, x402_router=router)
    stage = lanes_only.settlement_interval_s + lanes_only.settle_max_mine_s
    x402 = load_settings(x402_router=router).settle_latency()
    assert x402.build_to_land_s == lanes_only.settle_latency().build_to_land_s + 2 * stage
    assert x402.min_voucher_validity_s <= load_settings(x402_router=router).min_voucher_validity_s


def test_the_worker_and_the_api_refuse_a_chain_whose_thaw_period_is_too_short(
        sqlite_world: SettlementWorld, tmp_path: Path) -> None:
    world = sqlite_world  # its escrow thaws in 3600 s
    deployment_file = write_deployment(world.deployment, tmp_path / "deployments")
    common = {"rpc_url": world.anvil.rpc_url, "deployment_file": deployment_file, "database_url": world.db_url}
    slow = load_settings(epoch_max_age_s=3_600, **common)
    with pytest.raises(ConfigError, match="thaw period is too short"):
        SettlementRuntime.from_settings(slow)
    from node.settlement.runtime import check_chain_parameters  # what the API runs at start

    with pytest.raises(ConfigError, match="thaw period is too short"):
        check_chain_parameters(slow, world.deployment)
    fast = load_settings(epoch_max_age_s=600, **common)
    check_chain_parameters(fast, world.deployment)
    assert SettlementRuntime.from_settings(fast).service.policy.land_within_s == \
        fast.settle_latency().build_to_land_s


def test_deploy_refuses_a_thaw_period_that_lets_payers_withdraw_before_collection(fresh_anvil: object,
                                                                                  tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from node.cli import app

    started = time.monotonic()
    for thaw in ("0", "600"):
        result = CliRunner().invoke(app, ["chain", "deploy", "--rpc-url", fresh_anvil.rpc_url,  # type: ignore[attr-defined]
                                          "--out", str(tmp_path), "--thaw-period-s", thaw])
        assert result.exit_code != 0 and not list(tmp_path.glob("*.json")), result.output
    assert "thaw" in result.output and time.monotonic() - started < 30
