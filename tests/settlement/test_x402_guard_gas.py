"""The guard's claims cost the node gas (a `router.collect` from the operator key): a payer who pays a dust
charge and starts a withdrawal made the node claim at once, whatever the charge and whether or not the
withdrawal could take it. The guard now claims only what a withdrawal could take (the charge above what
it leaves in the channel), and, with the token's worth in ETH set (`token_per_eth`, as the settles use
it), only a charge that pays for its claim's gas (docs/x402.md, "A payer who withdraws: the guard")."""

from __future__ import annotations

import pytest

from node.chain.contract_client import ContractClient
from node.payment.service import Usage
from node.payment.x402.typed import CHANNELS_ADDRESS
from node.payment.x402.wire import Payment
from tests.fixtures import x402_chain_node as fixtures
from tests.fixtures.contracts import Roles
from tests.fixtures.indexer import drain
from tests.fixtures.x402_chain_node import X402Node
from tests.payment.x402 import conftest
from tests.payment.x402.sdk import Payer

pytestmark = pytest.mark.chain
anvil, roles, x402_node, x402_world = fixtures.anvil, fixtures.roles, fixtures.x402_node, conftest.x402_world


def _eth(node: X402Node, who: str) -> int:
    return int(node.world.chain.client.w3.eth.get_balance(who))


def _withdraw(node: X402Node, key: str, payment: Payment, amount: int) -> int:
    """The payer's `initiateWithdraw`; the ETH it paid in gas."""
    client = ContractClient(node.world.rpc_url, key)
    receipt = client.transact(client.contract("X402Channels", CHANNELS_ADDRESS).functions.initiateWithdraw(
        payment.config.as_tuple(), amount))
    return int(receipt["gasUsed"]) * int(receipt["effectiveGasPrice"])


def test_a_withdrawal_that_leaves_the_charge_in_the_channel_costs_the_node_no_claim(x402_node: X402Node,
                                                                                    roles: Roles) -> None:
    """The payer withdraws part of what it was not charged: the withdrawal cannot take the charge, so the
    guard sends nothing (before: a claim, the node's gas, every such withdrawal), and after the delay the
    channel still holds the whole charge for the epoch's claim."""
    payer = Payer(roles.payer, x402_node.world.rpc_url, x402_node.world.dep.chain_id)
    first, charged = x402_node.serve(payer, Usage(20, 10))
    left = first.deposit.amount - charged
    _withdraw(x402_node, roles.payer, first, left)  # all it was not charged: the charge stays in the channel
    drain(x402_node.indexer)
    node = x402_node.world.terms.authorizer
    before = _eth(x402_node, node)
    report = x402_node.guard()
    assert report.claimed == () and _eth(x402_node, node) == before, "nothing at risk: no claim, no gas"

    x402_node.wait_out_the_delay()
    ContractClient(x402_node.world.rpc_url, roles.payer).transact(ContractClient(
        x402_node.world.rpc_url, roles.payer).contract("X402Channels", CHANNELS_ADDRESS).functions.finalizeWithdraw(
        first.config.as_tuple()))
    state = x402_node.world.chain.channel(first.voucher.channel_id)
    assert state.balance - state.total_claimed == charged, "the charge is still there to claim, to the wei"


def test_a_dust_charge_below_its_claims_gas_is_not_claimed(x402_node: X402Node, roles: Roles) -> None:
    """The attack: be served one cheap request, withdraw everything, repeat with fresh channels. Each time
    the guard claimed the charge with a transaction of the operator key. With `token_per_eth` set, a
    charge worth less than its claim's gas is left: the node loses the dust, never more in gas."""
    world = x402_node.world
    payer = Payer(roles.payer, world.rpc_url, world.dep.chain_id)
    first, charged = x402_node.serve(payer, Usage(20, 10))
    spent_by_payer = _withdraw(x402_node, roles.payer, first, first.deposit.amount)
    drain(x402_node.indexer)
    gas_price = int(world.chain.client.w3.eth.gas_price)
    # one ETH is worth so many tokens that one claim's gas (at least 50,000) costs more than the charge
    x402_node.guard.token_per_eth = charged * 10**18 // (50_000 * gas_price)
    node = world.terms.authorizer
    before = _eth(x402_node, node)
    report = x402_node.guard()
    spent_by_node = before - _eth(x402_node, node)
    print(f"charge {charged}; payer's initiateWithdraw {spent_by_payer} wei; node's claims {spent_by_node} wei")
    assert report.claimed == () and spent_by_node == 0, "a claim costing more than it collects is not sent"

    x402_node.guard.token_per_eth = None  # the same channel, the token worth nothing in ETH terms: claimed
    assert len(x402_node.guard().claimed) == 1
    assert world.chain.channel(first.voucher.channel_id).total_claimed == charged
