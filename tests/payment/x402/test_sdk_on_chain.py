"""The x402 SDK's batch-settlement client against our channel contract on anvil, with the node's
checks, its deposit submission and its router: deposit, pay, pay again on the running total, recover
after client state loss through the corrective 402, then the router sweeps what was charged into the
node's escrow and Settlement collects it as the router's lane, and a payee is paid (docs/x402.md).

The node side here is the node's own modules driven by the test (the HTTP wiring is the next step)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import pytest
from eth_abi import encode
from eth_account import Account
from eth_hash.auto import keccak
from x402 import x402ClientSync
from x402.http.utils import encode_payment_signature_header
from x402.mechanisms.evm.batch_settlement.client import BatchSettlementEvmScheme, process_payment_response
from x402.mechanisms.evm.signers import EthAccountSignerWithRPC
from x402.schemas import PaymentRequired

from node.chain.anvil import Anvil
from node.chain.contract_client import ContractClient
from node.chain.deploy import deploy_all
from node.chain.x402_channels import ClaimRow, X402Chain, deploy_router, ensure_channel_contracts, token_domain
from node.payment.x402.channel_check import ChannelView, X402Refused, check_payment
from node.payment.x402.terms import X402Terms, payment_required
from node.payment.x402.wire import Payment, decode_payment, encode_header, payment_response
from node.protocol.eip712 import Domain
from node.protocol.voucher import Voucher, sign_voucher
from tests.fixtures.contracts import Roles

pytestmark = pytest.mark.chain
PRICE = 3_000  # the request's ceiling (accepted.amount)


@dataclass
class NodeSide:
    """The node's books for one channel and the calls it makes, per docs/x402.md."""

    terms: X402Terms
    chain: X402Chain
    view: ChannelView = field(default_factory=ChannelView)
    config: object = None

    def required(self, error: X402Refused | None = None) -> dict:
        states = {"channel_state": error.channel_state, "voucher_state": error.voucher_state} if error else {}
        out = payment_required("http://node.test/v1/chat/completions", [self.terms.requirements(PRICE, **states)])
        if error is not None:
            out["error"] = error.reason
        return out

    def serve(self, header: str, fee: int) -> dict:
        payment = decode_payment(header)
        mirror = self.chain.channel(payment.voucher.channel_id)
        self.view = replace(self.view, balance=mirror.balance, total_claimed=mirror.total_claimed,
                            pending_withdrawal=mirror.pending_withdrawal, refund_nonce=mirror.refund_nonce)
        checked = check_payment(payment, self.terms, self.view, ceiling=PRICE)
        if payment.deposit is not None:
            self.chain.deposit(payment)
            self.view = replace(self.view, balance=self.view.balance + payment.deposit.amount)
        self.config = payment.config
        self.view = replace(self.view, charged=self.view.charged + fee, signed_max=payment.voucher.max_claimable,
                            signature=payment.voucher.signature)
        return payment_response(self.terms.network, payment.config.payer, fee,
                                self.view.channel_state(checked.channel_id))


class Payer:
    """The SDK, as an app would use it: the scheme on the node's network, reading the chain by RPC."""

    def __init__(self, key: str, rpc_url: str, chain_id: int) -> None:
        self.scheme = BatchSettlementEvmScheme(EthAccountSignerWithRPC(Account.from_key(key), rpc_url))
        self.client = x402ClientSync().register(f"eip155:{chain_id}", self.scheme)
        self.client.set_spend_controls({"allowed_assets": True, "max_amount_per_payment": "1000000000000000000"})

    def pay(self, required: dict) -> tuple[str, Payment]:
        payload = self.client.create_payment_payload(PaymentRequired.model_validate(required))
        header = encode_payment_signature_header(payload)
        return header, decode_payment(header)

    def answered(self, payment: Payment, response: dict) -> None:
        local = {"channel_id": "0x" + payment.voucher.channel_id.hex(), "request_amount": str(PRICE)}
        if payment.deposit is not None:
            local["deposit_amount"] = str(payment.deposit.amount)
        process_payment_response(self.scheme._storage, {"PAYMENT-RESPONSE": encode_header(response)}.get, local)


@pytest.fixture
def world(anvil: Anvil, roles: Roles) -> tuple[NodeSide, ContractClient, object]:
    deployer = ContractClient(anvil.rpc_url, roles.deployer)
    token, _ = deployer.deploy("DemoToken3009")
    dep = deploy_all(anvil.rpc_url, roles.deployer, guardian=roles.address(roles.guardian),
                     treasury=roles.address(roles.treasury), protocol_bps=500, node_bps=1000, thaw_period_s=3600,
                     challenge_period_s=0, token=token)
    ensure_channel_contracts(deployer)
    node = roles.address(roles.node)
    router = deploy_router(deployer, node, dep.escrow)
    name, version = token_domain(deployer, token)
    deployer.transact(deployer.contract("DemoToken3009", token).functions.mint(roles.address(roles.payer), 10**18))
    terms = X402Terms(dep.chain_id, token, name, version, router, node, 86_400)
    return NodeSide(terms, X402Chain(ContractClient(anvil.rpc_url, roles.node), router)), deployer, dep


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
    corrective_402 = PaymentRequired.model_validate(node.required(corrective.value))
    assert fresh.scheme.process_corrective_payment_required(corrective_402)
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
