"""A payer who starts a timed withdrawal right after being served still pays: the hold stops serving the
channel beyond what the withdrawal leaves (read from the indexer's mirror), the worker's guard claims the
charge before the delay ends, the withdrawal pays the payer the rest to the wei; a channel whose claim
reverts is recorded and skipped, never stopping the others (docs/x402.md)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from sqlalchemy import and_, select

from node.chain.anvil import Anvil
from node.chain.contract_client import ContractClient
from node.chain.indexer import Indexer
from node.db.models import Lane
from node.db.payment_models import X402Channel
from node.payment.service import Usage
from node.payment.x402.channel_check import EXCEEDS_BALANCE, X402Refused
from node.settlement.x402_guard import claim_row
from tests.fixtures import x402_chain_node as fixtures
from tests.fixtures.contracts import Roles
from tests.fixtures.indexer import drain
from tests.fixtures.x402_chain_node import X402Node
from tests.payment.x402 import conftest
from tests.payment.x402.sdk import PRICE, Payer

pytestmark = pytest.mark.chain
anvil, roles, x402_node, x402_world = fixtures.anvil, fixtures.roles, fixtures.x402_node, conftest.x402_world


def test_a_payer_who_withdraws_right_after_being_served_pays_to_the_wei(x402_node: X402Node, roles: Roles) -> None:
    payer = Payer(roles.payer, x402_node.world.rpc_url, x402_node.world.dep.chain_id)
    first, _ = x402_node.serve(payer, Usage(20, 10))  # 200 + 1000
    _, charged = x402_node.serve(payer, Usage(10, 5))  # + 600
    assert charged == 1_800
    deposit = first.deposit.amount
    x402_node.payer_call(roles.payer, "initiateWithdraw", first, deposit)  # everything, the moment it was served
    drain(x402_node.indexer)
    assert x402_node.guard.due() and x402_node.world.chain.channel(first.voucher.channel_id).total_claimed == 0

    header, _ = payer.pay(x402_node.world.required())
    with pytest.raises(X402Refused) as refused:
        x402_node.x402.hold(x402_node.x402.check(header), PRICE)
    assert refused.value.reason == EXCEEDS_BALANCE, "nothing more is served on a withdrawing channel"

    report = x402_node.guard()  # the worker's next tick
    assert len(report.claimed) == 1 and not report.refused
    assert x402_node.world.chain.channel(first.voucher.channel_id).total_claimed == charged
    assert x402_node.escrowed() == charged, "claimed and swept into the router's escrow account"

    x402_node.wait_out_the_delay()
    before = x402_node.balance_of(first.config.payer)
    x402_node.payer_call(roles.payer, "finalizeWithdraw", first)
    assert x402_node.balance_of(first.config.payer) - before == deposit - charged, "the payer gets the rest, exactly"
    drain(x402_node.indexer)
    assert x402_node.guard.due() == [], "nothing left to claim"


def test_a_channel_whose_claim_reverts_does_not_stop_the_others(x402_node: X402Node, roles: Roles,
                                                                anvil: Anvil) -> None:
    """The node missed one channel's delay: its payer took all but part of the charge, then asked to withdraw
    again. That claim reverts (above the balance): recorded, and the other channel is claimed all the same."""
    other_key, world = anvil.keys[9], x402_node.world
    token = world.deployer.contract("DemoToken3009", world.dep.token)
    world.deployer.transact(token.functions.mint(ContractClient(world.rpc_url, other_key).address, 10**18))
    quick, slow = Payer(roles.payer, world.rpc_url, 31337), Payer(other_key, world.rpc_url, 31337)
    gone, gone_fee = x402_node.serve(quick, Usage(20, 10))
    kept, kept_fee = x402_node.serve(slow, Usage(10, 5))
    x402_node.payer_call(roles.payer, "initiateWithdraw", gone, gone.deposit.amount - gone_fee + 1)
    x402_node.wait_out_the_delay()
    x402_node.payer_call(roles.payer, "finalizeWithdraw", gone)  # leaves gone_fee - 1: less than was charged
    x402_node.payer_call(roles.payer, "initiateWithdraw", gone, 1)
    x402_node.payer_call(other_key, "initiateWithdraw", kept, kept.deposit.amount)
    drain(x402_node.indexer)
    assert len(x402_node.guard.due()) == 2

    report = x402_node.guard()
    assert len(report.claimed) == 1 and len(report.refused) == 1, report
    assert "ClaimAboveBalance" in next(iter(report.refused.values()))
    drain(x402_node.indexer)
    assert {lane for lane, _ in x402_node.guard.due()} == set(report.refused), "the refused one stays recorded as due"
    assert x402_node.world.chain.channel(kept.voucher.channel_id).total_claimed == kept_fee
    assert x402_node.world.chain.channel(gone.voucher.channel_id).total_claimed == 0
    assert x402_node.escrowed() == kept_fee


def test_a_stale_mirror_makes_the_guard_read_the_chain(x402_node: X402Node, roles: Roles) -> None:
    """The indexer has not run (as if stalled): the withdrawal is not in the mirror, and the guard still
    claims the channel before its delay, from what the chain says."""
    payer = Payer(roles.payer, x402_node.world.rpc_url, x402_node.world.dep.chain_id)
    first, charged = x402_node.serve(payer, Usage(20, 10))
    x402_node.payer_call(roles.payer, "initiateWithdraw", first, first.deposit.amount)
    report = x402_node.guard()
    assert len(report.claimed) == 1 and x402_node.world.chain.channel(first.voucher.channel_id).total_claimed == charged
    assert x402_node.guard.due() == [], "claimed: nothing due any more, read from the chain"


def test_a_mirror_that_lags_behind_the_head_is_not_trusted(x402_node: X402Node, roles: Roles) -> None:
    """The attack: the indexer is alive (it reached the chain a moment ago) but far behind the head, e.g.
    catching up after a restart. The payer withdraws right after being served; the withdrawal is not in
    the mirror yet, so a guard that trusted it claimed nothing, and once the delay ran out the payer took
    the whole deposit: the node was never paid for what it served."""
    payer = Payer(roles.payer, x402_node.world.rpc_url, x402_node.world.dep.chain_id)
    first, charged = x402_node.serve(payer, Usage(20, 10))
    x402_node.catch_up()
    x402_node.world.chain.client.w3.provider.make_request("anvil_mine", [hex(100)])
    x402_node.payer_call(roles.payer, "initiateWithdraw", first, first.deposit.amount)
    lagging = Indexer(replace(x402_node.indexer.config, initial_range=1, max_range=1), x402_node.world.rpc_url,
                      x402_node.factory, x402_node.indexer.contracts)
    assert not lagging.run_once().is_caught_up  # it reached the chain now, 100 blocks behind its head

    report = x402_node.guard()
    assert len(report.claimed) == 1, "the withdrawal is read from the chain, not from the lagging mirror"
    assert x402_node.world.chain.channel(first.voucher.channel_id).total_claimed == charged
    x402_node.wait_out_the_delay()
    before = x402_node.balance_of(first.config.payer)
    x402_node.payer_call(roles.payer, "finalizeWithdraw", first)
    assert x402_node.balance_of(first.config.payer) - before == first.deposit.amount - charged


def test_a_withdrawal_lowered_in_a_block_a_reorg_drops_never_takes_what_was_charged(x402_node: X402Node,
                                                                                    roles: Roles) -> None:
    """The channel's withdrawal of everything left has waited out its delay (final); the payer lowers it to
    1 in a block not final yet, is served against the money that frees, then a reorg drops the lowering
    and the payer finalizes the whole withdrawal before the worker's next tick: the node must still claim
    every fee it charged. A withdrawal counts as lowered only as of the last final block."""
    payer = Payer(roles.payer, x402_node.world.rpc_url, x402_node.world.dep.chain_id)
    first, charged = x402_node.serve(payer, Usage(20, 10))
    x402_node.payer_call(roles.payer, "initiateWithdraw", first, first.deposit.amount - charged)
    drain(x402_node.indexer)
    assert x402_node.guard().claimed == ()  # the withdrawal leaves the charge in the channel: claimed at its epoch
    x402_node.wait_out_the_delay()
    w3 = x402_node.world.chain.client.w3
    w3.provider.make_request("anvil_mine", [hex(x402_node.indexer.config.finality_depth)])
    drain(x402_node.indexer)  # the withdrawal is final and ready
    x402_node.payer_call(roles.payer, "initiateWithdraw", first, 1)
    lowered = w3.eth.block_number
    drain(x402_node.indexer)
    try:
        _, charged = x402_node.serve(payer, Usage(10, 5))
    except X402Refused as refused:
        assert refused.reason == EXCEEDS_BALANCE
    w3.provider.make_request("anvil_reorg", [w3.eth.block_number - lowered + 1, []])  # drops the lowering
    drain(x402_node.indexer)
    x402_node.payer_call(roles.payer, "finalizeWithdraw", first)
    drain(x402_node.indexer)
    x402_node.guard()  # the worker's next tick
    _epoch_claim(x402_node)
    assert x402_node.world.chain.channel(first.voucher.channel_id).total_claimed == charged


def _epoch_claim(node: X402Node) -> None:
    """What each channel's epoch does before its settle (X402Sweep): claim it up to what the node charged."""
    lanes = and_(Lane.payer == node.guard.router, Lane.lane == X402Channel.lane)
    with node.factory() as session:
        rows = session.execute(select(X402Channel, Lane.charged_total).join(Lane, lanes)).all()
    node.guard.intents.collect([claim_row(ch, int(charged)) for ch, charged in rows])
