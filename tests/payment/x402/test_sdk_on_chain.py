"""The x402 SDK's batch-settlement client against our channel contract on anvil, with the node's
checks, its deposit submission and its router: deposit, pay, pay again on the running total, recover
after client state loss through the corrective 402, then the router sweeps what was charged into the
node's escrow and Settlement collects it as the router's lane, and a payee is paid (docs/x402.md).

The node's books are in memory here; tests/payment/x402/test_service.py runs the same flow through
the node's payment service and database."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import pytest
from eth_abi import encode
from eth_hash.auto import keccak

from node.chain.anvil import Anvil
from node.chain.contract_client import ContractClient
from node.chain.deploy import Deployment
from node.chain.x402_channels import ClaimRow, X402Chain
from node.payment.x402.channel_check import ChannelView, X402Refused, check_payment
from node.payment.x402.terms import X402Terms
from node.payment.x402.wire import decode_payment, payment_response
from node.protocol.eip712 import Domain
from node.protocol.voucher import Voucher, sign_voucher
from tests.fixtures.contracts import Roles
from tests.payment.x402.conftest import X402World
from tests.payment.x402.sdk import PRICE, Payer

pytestmark = pytest.mark.chain


@dataclass
class NodeSide:
    """The node's checks and chain calls for one channel, with its books in memory."""

    world: X402World
    view: ChannelView = field(default_factory=ChannelView)

    @property
    def chain(self) -> X402Chain:
        return self.world.chain

    @property
    def terms(self) -> X402Terms:
        return self.world.terms

    def required(self, error: X402Refused | None = None) -> dict:
        return self.world.required(error)

    def serve(self, header: str, fee: int) -> dict:
        payment = decode_payment(header)
        mirror = self.chain.channel(payment.voucher.channel_id)
        self.view = replace(self.view, balance=mirror.balance, total_claimed=mirror.total_claimed,
                            pending_withdrawal=mirror.pending_withdrawal, refund_nonce=mirror.refund_nonce)
        checked = check_payment(payment, self.terms, self.view, ceiling=PRICE)
        if payment.deposit is not None:
            self.chain.deposit(payment)
            self.view = replace(self.view, balance=self.view.balance + payment.deposit.amount)
        self.view = replace(self.view, charged=self.view.charged + fee, signed_max=payment.voucher.max_claimable,
                            signature=payment.voucher.signature)
        return payment_response(self.terms.network, payment.config.payer, fee,
                                self.view.channel_state(checked.channel_id))


@pytest.fixture
def world(x402_world: X402World) -> tuple[NodeSide, ContractClient, Deployment]:
    return NodeSide(x402_world), x402_world.deployer, x402_world.dep


def test_sdk_deposits_pays_recovers_and_the_node_collects_into_its_pot(anvil: Anvil, roles: Roles, world) -> None:
    node, deployer, dep = world
    payer = Payer(roles.payer, anvil.rpc_url, dep.chain_id)

    header, first = payer.pay(node.required())
    assert first.kind == "deposit"
    payer.answered(first, node.serve(header, fee=2_500))
    on_chain = node.chain.channel(first.voucher.channel_id)
    assert on_chain.balance == first.deposit.amount > 0, "the node submitted the payer's deposit"

    header, second = payer.pay(node.required())
    assert second.kind == "voucher" and second.voucher.max_claimable == 2_500 + PRICE
    payer.answered(second, node.serve(header, fee=1_000))

    fresh = Payer(roles.payer, anvil.rpc_url, dep.chain_id)  # the app lost its channel state
    header, stale = fresh.pay(node.required())
    assert stale.voucher.max_claimable == PRICE, "cold start: on-chain totalClaimed (0) + price"
    with pytest.raises(X402Refused) as corrective:
        node.serve(header, fee=1)
    assert fresh.recover(node.required(corrective.value))
    header, resynced = fresh.pay(node.required())
    assert resynced.voucher.max_claimable == 3_500 + PRICE
    fresh.answered(resynced, node.serve(header, fee=500))

    charged = node.view.charged
    assert charged == 4_000
    row = ClaimRow(resynced.config, resynced.voucher.max_claimable, resynced.voucher.signature, charged)
    node.chain.collect([row])
    escrow = deployer.contract("PaymentEscrow", dep.escrow)
    assert deployer.call(escrow.functions.accounts(node.terms.router, node.terms.authorizer))[0] == charged

    lane = Voucher(node.terms.router, node.terms.authorizer, 0, charged, bytes(32), 2**40)
    signature = sign_voucher(roles.node, lane, Domain(dep.chain_id, dep.settlement))
    settlement = node.chain.client.contract("Settlement", dep.settlement)
    leaf = _leaf(roles.address(roles.contributor), charged)  # a one-leaf tree: the root is the leaf
    node.chain.client.transact(settlement.functions.settle(
        1, [((lane.payer, lane.node, lane.lane, lane.cumulative, lane.request_hash, lane.deadline), signature)],
        [charged], leaf, charged, bytes(32), 3))
    contributor = roles.address(roles.contributor)
    deployer.transact(settlement.functions.claim(node.terms.authorizer, 1, contributor, charged, []))
    token = deployer.contract("DemoToken3009", dep.token)
    assert deployer.call(token.functions.balanceOf(contributor)) == charged


def test_a_payer_who_withdraws_right_after_being_served_still_pays(anvil: Anvil, roles: Roles, world) -> None:
    node, deployer, dep = world
    payer = Payer(roles.payer, anvil.rpc_url, dep.chain_id)
    header, first = payer.pay(node.required())
    payer.answered(first, node.serve(header, fee=2_000))
    channels = ContractClient(anvil.rpc_url, roles.payer).contract("X402Channels", node.chain.channels.address)
    ContractClient(anvil.rpc_url, roles.payer).transact(
        channels.functions.initiateWithdraw(first.config.as_tuple(), first.deposit.amount))
    header, _ = payer.pay(node.required())
    with pytest.raises(X402Refused) as refused:
        node.serve(header, fee=1)
    assert refused.value.reason.endswith("cumulative_exceeds_balance"), "nothing more on a withdrawing channel"
    node.chain.collect([ClaimRow(first.config, first.voucher.max_claimable, first.voucher.signature, 2_000)])
    assert node.chain.channel(first.voucher.channel_id).total_claimed == 2_000, "claimed within the delay"
    escrow = deployer.contract("PaymentEscrow", dep.escrow)
    assert deployer.call(escrow.functions.accounts(node.terms.router, node.terms.authorizer))[0] == 2_000


def _leaf(account: str, amount: int) -> bytes:
    return keccak(keccak(encode(["address", "uint256"], [account, amount])))
