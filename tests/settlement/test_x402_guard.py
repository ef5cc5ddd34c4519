"""A payer who starts a timed withdrawal right after being served still pays: the hold stops serving the
channel beyond what the withdrawal leaves (read from the indexer's mirror), the worker's guard claims the
charge before the delay ends, the withdrawal pays the payer the rest to the wei; a channel whose claim
reverts is recorded and skipped, never stopping the others (docs/x402.md)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from sqlalchemy.orm import Session, sessionmaker

from node.chain.anvil import Anvil
from node.chain.binding import IndexedContracts
from node.chain.contract_client import ContractClient
from node.chain.indexer import Indexer, IndexerConfig
from node.db.session import make_engine, session_factory, upgrade
from node.payment.ledger import Ledger
from node.payment.service import PaymentService, Usage
from node.payment.x402.book import ChannelBook
from node.payment.x402.channel_check import EXCEEDS_BALANCE, X402Refused
from node.payment.x402.channel_mirror import ChannelMirror
from node.payment.x402.service import X402Payments
from node.payment.x402.typed import CHANNELS_ADDRESS
from node.payment.x402.wire import Payment
from node.protocol.eip712 import Domain
from node.settlement.x402_guard import X402Guard
from tests.fixtures.contracts import Roles
from tests.fixtures.indexer import drain
from tests.payment.x402.conftest import X402World, x402_world  # noqa: F401 (the fixture)
from tests.payment.x402.sdk import PRICE, Payer
from tests.payment.x402.test_service import PRICING, _serve

pytestmark = pytest.mark.chain
DELAY = 86_400


@dataclass
class Node:
    world: X402World
    x402: X402Payments
    indexer: Indexer
    guard: X402Guard
    factory: sessionmaker[Session]

    def serve(self, payer: Payer, usage: Usage) -> tuple[Payment, int]:
        header, payment = payer.pay(self.world.required())
        total, _, response = _serve(self.x402, header, usage)
        payer.answered(payment, response)
        return payment, total

    def payer_call(self, key: str, fn: str, payment: Payment, *args: object) -> None:
        client = ContractClient(self.world.rpc_url, key)
        client.transact(getattr(client.contract("X402Channels", CHANNELS_ADDRESS).functions, fn)(
            payment.config.as_tuple(), *args))

    def wait_out_the_delay(self) -> None:
        provider = self.world.chain.client.w3.provider
        provider.make_request("evm_increaseTime", [DELAY + 1])
        provider.make_request("evm_mine", [])

    def escrowed(self) -> int:
        escrow = self.world.deployer.contract("PaymentEscrow", self.world.dep.escrow)
        return int(self.world.deployer.call(escrow.functions.accounts(self.world.terms.router,
                                                                      self.world.terms.authorizer))[0])

    def balance_of(self, who: str) -> int:
        token = self.world.deployer.contract("DemoToken3009", self.world.dep.token)
        return int(self.world.deployer.call(token.functions.balanceOf(who)))


@pytest.fixture
def anvil() -> Iterator[Anvil]:
    """A chain per test: these wait out the withdraw delay, and the SDK dates its deposits by the wall clock."""
    with Anvil() as chain:
        yield chain


@pytest.fixture
def roles(anvil: Anvil) -> Roles:
    return Roles(*anvil.keys[:8])


@pytest.fixture
def node(db_url: str, x402_world: X402World, roles: Roles) -> Node:  # noqa: F811
    upgrade(db_url)
    factory = session_factory(make_engine(db_url))
    dep, address = x402_world.dep, x402_world.terms.authorizer
    payments = PaymentService(Ledger(factory, address), Domain(dep.chain_id, dep.settlement), address, PRICING)
    x402 = X402Payments(payments, ChannelBook(factory, address), x402_world.terms, roles.node,
                        x402_world.chain.channel, x402_world.chain.deposit, read_mirror=ChannelMirror(factory, DELAY))
    contracts = IndexedContracts(dep.dataset_registry, dep.adapter_registry, dep.escrow, dep.settlement,
                                 CHANNELS_ADDRESS)
    config = IndexerConfig(chain_id=dep.chain_id, confirmations=0, finality_depth=16, start_block=dep.from_block,
                           backoff_s=0.01)
    indexer = Indexer(config, x402_world.rpc_url, factory, contracts)
    return Node(x402_world, x402, indexer, X402Guard(factory, x402_world.chain, address), factory)


def test_a_payer_who_withdraws_right_after_being_served_pays_to_the_wei(node: Node, roles: Roles) -> None:
    payer = Payer(roles.payer, node.world.rpc_url, node.world.dep.chain_id)
    first, _ = node.serve(payer, Usage(20, 10))  # 200 + 1000
    _, charged = node.serve(payer, Usage(10, 5))  # + 600
    assert charged == 1_800
    deposit = first.deposit.amount
    node.payer_call(roles.payer, "initiateWithdraw", first, deposit)  # everything, the moment it was served
    drain(node.indexer)
    assert node.guard.due() and node.world.chain.channel(first.voucher.channel_id).total_claimed == 0

    header, _ = payer.pay(node.world.required())
    with pytest.raises(X402Refused) as refused:
        node.x402.hold(node.x402.check(header), PRICE)
    assert refused.value.reason == EXCEEDS_BALANCE, "nothing more is served on a withdrawing channel"

    report = node.guard()  # the worker's next tick
    assert len(report.claimed) == 1 and not report.refused
    assert node.world.chain.channel(first.voucher.channel_id).total_claimed == charged
    assert node.escrowed() == charged, "claimed and swept into the router's escrow account"

    node.wait_out_the_delay()
    before = node.balance_of(first.config.payer)
    node.payer_call(roles.payer, "finalizeWithdraw", first)
    assert node.balance_of(first.config.payer) - before == deposit - charged, "the payer gets the rest, exactly"
    drain(node.indexer)
    assert node.guard.due() == [], "nothing left to claim"


def test_a_channel_whose_claim_reverts_does_not_stop_the_others(node: Node, roles: Roles, anvil: Anvil) -> None:
    """The node missed one channel's delay: its payer took all but part of the charge, then asked to withdraw
    again. That claim reverts (above the balance): recorded, and the other channel is claimed all the same."""
    other_key = anvil.keys[9]
    token = node.world.deployer.contract("DemoToken3009", node.world.dep.token)
    node.world.deployer.transact(token.functions.mint(ContractClient(node.world.rpc_url, other_key).address, 10**18))
    quick, slow = Payer(roles.payer, node.world.rpc_url, 31337), Payer(other_key, node.world.rpc_url, 31337)
    gone, gone_fee = node.serve(quick, Usage(20, 10))
    kept, kept_fee = node.serve(slow, Usage(10, 5))
    node.payer_call(roles.payer, "initiateWithdraw", gone, gone.deposit.amount - gone_fee + 1)
    node.wait_out_the_delay()
    node.payer_call(roles.payer, "finalizeWithdraw", gone)  # leaves gone_fee - 1: less than was charged
    node.payer_call(roles.payer, "initiateWithdraw", gone, 1)
    node.payer_call(other_key, "initiateWithdraw", kept, kept.deposit.amount)
    drain(node.indexer)
    assert len(node.guard.due()) == 2

    report = node.guard()
    assert len(report.claimed) == 1 and len(report.refused) == 1, report
    assert "ClaimAboveBalance" in next(iter(report.refused.values()))
    drain(node.indexer)
    assert {lane for lane, _ in node.guard.due()} == set(report.refused), "the refused one stays recorded as due"
    assert node.world.chain.channel(kept.voucher.channel_id).total_claimed == kept_fee
    assert node.world.chain.channel(gone.voucher.channel_id).total_claimed == 0
    assert node.escrowed() == kept_fee
