"""The indexer mirrors the x402 channel contract (deposits, claims, refunds, withdrawals) as the chain
has it, through reorgs, on both databases; a channel's deposits count once final (docs/x402.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from node.chain.binding import IndexedContracts
from node.chain.contract_client import ContractClient
from node.chain.events import ChainEvent
from node.chain.projection import replay
from node.chain.x402_channels import ClaimRow, X402Chain, deploy_router, ensure_channel_contracts, token_domain
from node.db.payment_models import ChannelAccount
from node.payment.x402.terms import X402Terms, payment_required
from node.payment.x402.typed import CHANNELS_ADDRESS
from node.payment.x402.wire import Payment
from tests.fixtures.indexer import ChainWorld, drain, make_indexer
from tests.payment.x402.sdk import PRICE, Payer

pytestmark = pytest.mark.chain
NODE, PAYER = 4, 5


@dataclass
class Channels:
    world: ChainWorld
    node: X402Chain  # as the node (its key is the channels' receiver authorizer)
    terms: X402Terms
    payer: Payer

    def deposit(self) -> Payment:
        _, payment = self.payer.pay(payment_required("http://node.test/x", [self.terms.requirements(PRICE)]))
        assert payment.deposit is not None
        self.node.deposit(payment)
        return payment

    def payer_call(self, fn_name: str, payment: Payment, *args: Any, wait: bool = True) -> Any:
        fn = getattr(self.node.channels.functions, fn_name)(payment.config.as_tuple(), *args)
        return self.world.send(fn, PAYER, wait=wait)


@pytest.fixture
def channels(world: ChainWorld) -> Channels:
    node_key = world.keys[NODE]
    ensure_channel_contracts(ContractClient(world.chain.rpc_url, world.keys[0]))
    node = ContractClient(world.chain.rpc_url, node_key)
    router = deploy_router(node, node.address, world.dep.escrow)
    world.send(world.token.functions.mint(world.addresses[PAYER], 10**18), PAYER)
    name, version = token_domain(node, world.dep.token)
    terms = X402Terms(world.dep.chain_id, world.dep.token, name, version, router, node.address, 86_400)
    world.contracts = IndexedContracts(**{**world.contracts.__dict__, "x402_channels": CHANNELS_ADDRESS})
    return Channels(world, X402Chain(node, router), terms,
                    Payer(world.keys[PAYER], world.chain.rpc_url, world.dep.chain_id))


def _row(factory: sessionmaker[Session], channel: bytes) -> ChannelAccount:
    with factory() as s:
        return s.scalars(select(ChannelAccount).where(ChannelAccount.channel_id == "0x" + channel.hex())).one()


def _same_as_chain(channels: Channels, factory: sessionmaker[Session], channel: bytes) -> ChannelAccount:
    row, chain = _row(factory, channel), channels.node.channel(channel)
    assert (row.balance, row.total_claimed, row.pending_withdrawal, row.refund_nonce) == (
        chain.balance, chain.total_claimed, chain.pending_withdrawal, chain.refund_nonce)
    return row


def test_deposits_claims_refunds_and_withdrawals_are_mirrored_as_the_chain_has_them(
        channels: Channels, db_url: str) -> None:
    indexer, factory = make_indexer(channels.world, db_url)
    payment = channels.deposit()
    channel, amount = payment.voucher.channel_id, payment.deposit.amount
    channels.node.collect([ClaimRow(payment.config, payment.voucher.max_claimable, payment.voucher.signature, 1_000)])
    channels.payer_call("initiateWithdraw", payment, 500)
    drain(indexer)
    row = _same_as_chain(channels, factory, channel)
    assert (row.payer, row.receiver) == (payment.config.payer.lower(), channels.terms.router.lower())
    assert row.deposited == amount and row.withdraw_ready_at is not None

    channels.node.client.transact(channels.node.channels.functions.refund(payment.config.as_tuple(), 200))
    drain(indexer)
    row = _same_as_chain(channels, factory, channel)
    assert (row.refunded, row.pending_withdrawal, row.refund_nonce) == (200, 300, 1), "a refund shrinks the withdrawal"

    channels.world.chain.rpc("evm_increaseTime", 86_400)
    channels.payer_call("finalizeWithdraw", payment)
    drain(indexer)
    row = _same_as_chain(channels, factory, channel)
    assert (row.withdrawn, row.balance, row.withdraw_ready_at) == (300, amount - 500, None)


def test_a_withdrawal_reorged_away_leaves_the_mirror_and_one_re_included_comes_back(
        channels: Channels, db_url: str) -> None:
    indexer, factory = make_indexer(channels.world, db_url)
    payment = channels.deposit()
    channels.world.mine(2)
    sent = channels.payer_call("initiateWithdraw", payment, 700)
    drain(indexer)
    assert _row(factory, payment.voucher.channel_id).pending_withdrawal == 700

    channels.world.reorg(1)  # the block with the withdrawal is replaced by an empty one
    drain(indexer)
    assert _same_as_chain(channels, factory, payment.voucher.channel_id).pending_withdrawal == 0

    channels.world.reorg(1, [(sent.raw, 0)])  # the same signed withdrawal lands on the new branch
    drain(indexer)
    assert _same_as_chain(channels, factory, payment.voucher.channel_id).pending_withdrawal == 700


def test_a_channel_deposit_counts_once_final(channels: Channels, db_url: str) -> None:
    indexer, factory = make_indexer(channels.world, db_url, finality_depth=4)
    payment = channels.deposit()
    drain(indexer)
    row = _row(factory, payment.voucher.channel_id)
    assert row.balance == row.pending_deposits == payment.deposit.amount and row.pending_until_block is not None

    channels.world.mine(5)
    drain(indexer)
    row = _row(factory, payment.voucher.channel_id)
    assert (row.pending_deposits, row.pending_until_block, row.is_final) == (0, None, True)


def _event(name: str, block: int, **args: Any) -> ChainEvent:
    return ChainEvent(31337, block, "0x" + "bb" * 32, "0x" + "cc" * 32, block, CHANNELS_ADDRESS.lower(), name,
                      {"channelId": "0x" + "01" * 32, **args})


def test_a_channel_funded_before_the_mirrors_first_block_is_followed_from_its_next_deposit() -> None:
    """The reference contract on a shared chain holds channels older than this node's deployment: their
    claims and withdrawals alone make no row (and never halt the indexer); their next deposit does."""
    assert replay(None, [_event("ChannelClaimed", 1, receiver="0x" + "0e" * 20, totalClaimed=5, amount=5),
                         _event("ChannelWithdrawInitiated", 2, amount=3, readyAt=10**9)]) is None
    row = replay(None, [_event("ChannelRefunded", 3, amount=1, nextNonce=1),
                        _event("ChannelDeposited", 4, payer="0x" + "0a" * 20, amount=7, balance=11)])
    assert row is not None and (row["balance"], row["payer"], row["total_claimed"]) == (11, "0x" + "0a" * 20, 0)
