"""A payer that signs the least voucher validity, or thaws its escrow, at the worst moment still pays.

The node checks a new voucher's deadline and the escrow when it places the hold, but charges up to a hold's
life later (a long generation, a stream read slowly), and only then does the receipt start its way to
the chain. A voucher that has just the worst-case settle latency left at the hold, or a thaw started right
after it, would let a payer take a long answer and leave nothing the node can collect. Real anvil, real
contracts, real database, the node's default settings.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable

import pytest
from eth_hash.auto import keccak

from node.config import Settings, load_settings
from node.db.loss import LossReason
from node.db.models import EpochState
from node.errors import ConfigError
from node.payment.ledger import Ledger
from node.payment.pricing import Pricing
from node.payment.service import Hold, PaymentService, Usage
from node.payment.voucher_check import check_voucher
from node.protocol.receipt import Receipt, SignedReceipt, adapter_id_bytes
from node.protocol.voucher import SignedVoucher, Voucher, request_hash, sign_voucher
from node.settlement.latency import SettleLatency
from node.settlement.runtime import epoch_policy
from node.settlement.service import SettlementService
from tests.adversarial.settlement_steps import LONG, lost, on_chain, payer, settles, tick_until
from tests.fixtures.settlement import OPERATOR, PAYERS, SettlementWorld, address

pytestmark = pytest.mark.chain
ROUTER = "0x" + "11" * 20
FEE = 7_000


def _chain_time(world: SettlementWorld) -> int:
    return int(world.w3.eth.get_block("latest")["timestamp"])  # type: ignore[typeddict-item]


def _hold_the_least_valid_voucher(world: SettlementWorld, payments: PaymentService, settings: Settings) -> Hold:
    """A new voucher whose deadline is exactly the node's published minimum from now: accepted."""
    key, body = world.key(PAYERS[0]), os.urandom(16)
    deadline = _chain_time(world) + settings.min_voucher_validity_s
    voucher = Voucher(address(key), world.node, 0, FEE, request_hash(body), deadline)
    header = SignedVoucher.of(voucher, sign_voucher(key, voucher, world.domain))
    held = payments.hold(check_voucher(header, body, domain=world.domain, node=world.node), FEE)
    assert isinstance(held, Hold)
    return held


def _charge(world: SettlementWorld, payments: PaymentService, hold: Hold) -> None:
    adapter = world.adapter_ids[0]

    def issue(fee: int) -> SignedReceipt:
        receipt = Receipt(hold.checked.digest, adapter_id_bytes(adapter), world.w3.eth.block_number,
                          world.lineage_hashes[adapter], 3, 5, fee, keccak(b"answer"), 1)
        return SignedReceipt.sign(receipt, world.key(OPERATOR), world.node, world.domain)

    payments.finish(hold, Usage(FEE, 0), issue, lambda receipt: {"receipt": receipt})


@pytest.mark.parametrize("router", [None, ROUTER], ids=["lanes", "x402"])
def test_a_voucher_of_the_least_validity_the_node_accepts_pays_for_the_longest_request_it_holds(
        settlement_world: SettlementWorld, router: str | None) -> None:
    world, settings = settlement_world, load_settings(x402_router=router)
    latency = settings.settle_latency()
    ledger = Ledger(world.factory, world.node, reservation_ttl_s=settings.reservation_ttl_s)
    payments = PaymentService(ledger, world.domain, world.node, Pricing(1, 0),
                              min_validity_s=settings.min_voucher_validity_s, clock=lambda: _chain_time(world))
    hold = _hold_the_least_valid_voucher(world, payments, settings)
    world.anvil.rpc("evm_increaseTime", int(payments.max_delivery_s))  # a stream read as slowly as it may be
    world.mine()
    _charge(world, payments, hold)
    # its epoch is due at once (the voucher expires within the margin), noticed a beat late, and waits
    # behind an unsent epoch: the worst case the node promises to land within
    world.anvil.rpc("evm_increaseTime", int(latency.worst_case_s - latency.build_to_land_s))
    world.mine()
    service = world.service(epoch_policy(settings))
    epoch_id = service.close_epoch()
    service.tick()  # builds it: what no voucher valid when the settle lands covers is lost here
    assert lost(world) == []
    tick_until(world, service, epoch_id, EpochState.FINAL)
    assert on_chain(world)[1] == FEE


@pytest.mark.parametrize("router", [None, ROUTER], ids=["lanes", "x402"])
def test_an_escrow_thawing_from_the_moment_of_a_hold_outlasts_the_settle_of_its_charge(router: str | None) -> None:
    """The thaw period the node accepts must outlast the time the mirror the holds read may not show a thaw
    (as stale as the node still serves paid work on), a hold's life (the hold read the escrow before the
    thaw), then the epoch's age, then the worst-case settle latency."""
    settings = load_settings(x402_router=router)
    latency = settings.settle_latency()
    unseen_s = settings.max_mirror_lag_s + settings.max_mirror_lag_blocks * settings.block_time_s
    settled_by = unseen_s + settings.reservation_ttl_s + latency.max_age_s + latency.worst_case_s
    with pytest.raises(ConfigError, match="thaw period is too short"):
        latency.check_thaw_period(int(settled_by))



def _next_block_at(world: SettlementWorld, timestamp: int) -> None:
    world.anvil.rpc("evm_setNextBlockTimestamp", timestamp)
    world.mine()


def _tightest_settings(**overrides: float) -> Settings:
    """The least voucher validity and expiry margin the node accepts."""
    least = load_settings(**overrides).settle_latency()  # type: ignore[arg-type]
    return load_settings(min_voucher_validity_s=math.ceil(least.min_voucher_validity_s),  # type: ignore[arg-type]
                         epoch_expiry_margin_s=least.worst_case_s, **overrides)


def _built_at_the_last_moment(world: SettlementWorld, settings: Settings,
                              others: Callable[[], object] = lambda: None) -> tuple[SettlementService, int, int]:
    """A voucher of the least validity held, charged at the end of the hold, and its epoch (with what `others`
    pays) built as late as the horizon allows: (service, epoch id, chain time when the build is done, counting
    the build's wall time, since the chain's clock runs while the node builds)."""
    ledger = Ledger(world.factory, world.node, reservation_ttl_s=settings.reservation_ttl_s)
    payments = PaymentService(ledger, world.domain, world.node, Pricing(1, 0),
                              min_validity_s=settings.min_voucher_validity_s, clock=lambda: _chain_time(world))
    hold = _hold_the_least_valid_voucher(world, payments, settings)
    _next_block_at(world, _chain_time(world) + int(payments.max_delivery_s))
    _charge(world, payments, hold)
    others()
    building_at = hold.checked.deadline - int(settings.settle_latency().build_to_land_s)
    _next_block_at(world, building_at)
    service = world.service(epoch_policy(settings))
    started = time.monotonic()
    epoch_id = service.close_epoch()
    assert epoch_id is not None
    service.tick()  # builds it
    assert service.state(epoch_id) is EpochState.BUILT
    return service, epoch_id, building_at + math.ceil(time.monotonic() - started)


def _sent_and_landed_in_the_worst_case(world: SettlementWorld, service: SettlementService, epoch_id: int,
                                       latency: SettleLatency, built_at: int) -> None:
    """Its predecessor mined and a tick to send it, then the settle mined late, reorged and mined again."""
    sent_at = built_at + int(latency.mine_s + latency.beat_s + latency.sweep_s)
    _next_block_at(world, sent_at)
    world.anvil.rpc("evm_setAutomine", False)
    try:
        service.tick()
        assert service.state(epoch_id) is EpochState.SUBMITTED
        _next_block_at(world, sent_at + int(latency.mine_s + latency.reorg_s))
    finally:
        world.anvil.rpc("evm_setAutomine", True)
    for _ in range(10):
        service.tick()
        world.mine()
        world.sync()


def test_a_voucher_of_the_least_validity_outlives_the_time_its_epoch_takes_to_build(
        settlement_world: SettlementWorld) -> None:
    """The chain's clock runs while the node builds an epoch (the rewards tree holds every payee ever paid: 200k
    of them took 10 s to build and write on the dev box). A voucher with exactly the least validity the node
    accepts, its epoch built at the last moment the horizon allows, must still be collected when the build's
    own time, then the worst-case wait to send and to land, have passed."""
    world, settings = settlement_world, _tightest_settings()
    first_block = world.w3.eth.block_number
    service, epoch_id, built_at = _built_at_the_last_moment(world, settings)
    assert lost(world) == []
    _sent_and_landed_in_the_worst_case(world, service, epoch_id, settings.settle_latency(), built_at)
    assert lost(world) == []
    assert service.state(epoch_id) is EpochState.FINAL and on_chain(world)[1] == FEE
    assert [reverted for *_, reverted in settles(world, first_block)] == [False]


def test_a_build_longer_than_its_allowance_is_redone_so_its_settle_never_reverts_for_the_others(
        settlement_world: SettlementWorld) -> None:
    """A node whose build outgrew `epoch_build_allowance_s` (0 here: any build does) builds the epoch again
    with the time it took in the horizon. The voucher that expires before the settle can land is a loss at
    the build, not a settle reverting on chain at it, failing the epoch, its gas and every other payer's
    collection held up until a rebuild."""
    world, settings = settlement_world, _tightest_settings(epoch_build_allowance_s=0)
    first_block = world.w3.eth.block_number

    def honest() -> None:
        world.pay(1, 0, world.adapter_ids[0], FEE, validity_s=LONG)

    service, epoch_id, built_at = _built_at_the_last_moment(world, settings, honest)
    assert lost(world) == [(payer(world, 0), 0, FEE, LossReason.VOUCHER_EXPIRED)]
    _sent_and_landed_in_the_worst_case(world, service, epoch_id, settings.settle_latency(), built_at)
    assert [reverted for *_, reverted in settles(world, first_block)] == [False]
    assert service.state(epoch_id) is EpochState.FINAL and on_chain(world)[1] == FEE
