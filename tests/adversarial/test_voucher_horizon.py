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

import pytest
from eth_hash.auto import keccak

from node.config import Settings, load_settings
from node.db.models import EpochState
from node.errors import ConfigError
from node.payment.ledger import Ledger
from node.payment.pricing import Pricing
from node.payment.service import Hold, PaymentService, Usage
from node.payment.voucher_check import check_voucher
from node.protocol.receipt import Receipt, SignedReceipt, adapter_id_bytes
from node.protocol.voucher import SignedVoucher, Voucher, request_hash, sign_voucher
from node.settlement.runtime import epoch_policy
from tests.adversarial.settlement_steps import lost, on_chain, tick_until
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


def test_a_voucher_of_the_least_validity_outlives_the_time_its_epoch_takes_to_build(
        settlement_world: SettlementWorld) -> None:
    """The chain's clock runs while the node builds an epoch (the rewards tree holds every payee ever paid: 200k
    of them took 10 s to build and write on the dev box). A voucher with exactly the least validity the node
    accepts, its epoch built at the last moment the horizon allows, must still be collected when the build's
    own time, then the worst-case wait to send and to land, have passed."""
    world = settlement_world
    loose = load_settings()
    least = loose.settle_latency()
    settings = load_settings(min_voucher_validity_s=math.ceil(least.min_voucher_validity_s),
                             epoch_expiry_margin_s=least.worst_case_s)  # the tightest the node accepts
    latency = settings.settle_latency()
    ledger = Ledger(world.factory, world.node, reservation_ttl_s=settings.reservation_ttl_s)
    payments = PaymentService(ledger, world.domain, world.node, Pricing(1, 0),
                              min_validity_s=settings.min_voucher_validity_s, clock=lambda: _chain_time(world))
    hold = _hold_the_least_valid_voucher(world, payments, settings)
    deadline = hold.checked.deadline
    _next_block_at(world, _chain_time(world) + int(payments.max_delivery_s))
    _charge(world, payments, hold)
    building_at = deadline - int(latency.build_to_land_s)  # the epoch built as late as the horizon allows
    _next_block_at(world, building_at)
    service = world.service(epoch_policy(settings))
    started = time.monotonic()
    epoch_id = service.close_epoch()
    assert epoch_id is not None
    service.tick()  # builds it
    built_in_s = math.ceil(time.monotonic() - started)  # what the chain's clock ran meanwhile
    assert service.state(epoch_id) is EpochState.BUILT and lost(world) == []
    # then the worst case: its predecessor mined and a tick to send it, and the settle mined late, reorged, mined again
    sent_at = building_at + built_in_s + int(latency.mine_s + latency.beat_s + latency.sweep_s)
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
    assert lost(world) == []
    assert service.state(epoch_id) is EpochState.FINAL and on_chain(world)[1] == FEE
