"""The guard's claims share the settles' nonce discipline: they are transaction-manager intents of the
operator key, so a claim sent in the same tick as a settle never takes the settle's nonce (even one the
mempool dropped: the manager re-broadcasts it), both land in nonce order, and a stuck claim is bumped
like a stuck settle (docs/x402.md, "One epoch with x402 receipts")."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import select
from web3 import Web3

from node.chain.tx_manager import FeePolicy, TxManager, TxState
from node.db.models import SettlementEpoch, TxIntent
from node.payment.service import Usage
from node.protocol.voucher import SignedVoucher
from node.settlement.refusal import NOT_YET
from node.settlement.x402_guard import X402Guard
from node.settlement.x402_sweep import X402Sweep
from tests.fixtures import x402_chain_node as fixtures
from tests.fixtures.contracts import Roles
from tests.fixtures.indexer import drain
from tests.fixtures.x402_chain_node import X402Node
from tests.payment.x402 import conftest
from tests.payment.x402.sdk import Payer

pytestmark = pytest.mark.chain
anvil, roles, x402_node, x402_world = fixtures.anvil, fixtures.roles, fixtures.x402_node, conftest.x402_world


def _withdrawing(node: X402Node, roles: Roles) -> tuple[bytes, int]:
    """A channel charged and then asked to withdraw: the guard's to claim. (channel, charged)"""
    payer = Payer(roles.payer, node.world.rpc_url, node.world.dep.chain_id)
    first, charged = node.serve(payer, Usage(20, 10))
    node.payer_call(roles.payer, "initiateWithdraw", first, first.deposit.amount)
    drain(node.indexer)
    assert node.guard.due()
    return first.voucher.channel_id, charged


def _pending(w3: Web3) -> list[str]:
    return [tx["hash"].to_0x_hex() for tx in w3.eth.get_block("pending", full_transactions=True)["transactions"]]


def _x402_keys(node: X402Node) -> list[str]:
    return [k for k in node.tx.store.open_keys(node.tx.sender) if k.startswith("x402")]


def test_a_guard_claim_in_the_settles_tick_takes_no_nonce_of_it(x402_node: X402Node, roles: Roles) -> None:
    channel, charged = _withdrawing(x402_node, roles)
    tx, w3 = x402_node.tx, x402_node.tx.w3
    w3.provider.make_request("evm_setAutomine", [False])
    tick = threading.Thread(target=x402_node.guard, daemon=True)
    try:
        settle = tx.send("settle:tick:1", tx.sender, "0x")  # the tick's settle, broadcast...
        w3.provider.make_request("anvil_dropTransaction", [settle.latest.tx_hash])  # ...and lost by the mempool
        tick.start()  # the same tick's guard claims the withdrawing channel
        deadline = time.monotonic() + 10
        while not _pending(w3) and tick.is_alive():
            assert time.monotonic() < deadline, "the guard sent nothing"
            time.sleep(0.05)
        w3.provider.make_request("evm_mine", [])
        tick.join(timeout=10)
        for _ in range(3):  # the worker's next polls: re-broadcast what the mempool lost, then follow
            settle = tx.poll(settle.key)
            for key in _x402_keys(x402_node):
                tx.poll(key)
            w3.provider.make_request("evm_mine", [])
        settle = tx.poll(settle.key)
    finally:
        w3.provider.make_request("evm_setAutomine", [True])
        tick.join(timeout=10)
    assert settle.state in (TxState.MINED, TxState.FINAL), f"the settle lost its nonce {settle.nonce}: {settle.error}"
    assert x402_node.world.chain.channel(channel).total_claimed == charged, "and the guard's claim landed"
    claims = [tx.store.load(key) for key in _claim_keys(x402_node)]
    assert claims and all(c is not None and c.nonce > settle.nonce and c.state is not TxState.FAILED
                          and (c.mined_block or 0) >= (settle.mined_block or 0) for c in claims)


def _claim_keys(node: X402Node) -> list[str]:
    """Every x402 intent of the operator key, open or not."""
    with node.factory() as session:
        return list(session.scalars(select(TxIntent.key).where(TxIntent.key.like("x402%"))))


def test_a_stuck_guard_claim_is_bumped_at_the_next_tick_and_lands(x402_node: X402Node, roles: Roles) -> None:
    channel, charged = _withdrawing(x402_node, roles)
    now = [1_000.0]
    tx = TxManager(x402_node.tx.w3, roles.node, x402_node.tx.store, FeePolicy(confirmations=1, bump_after_s=30),
                   clock=lambda: now[0])
    guard = X402Guard(x402_node.factory, x402_node.world.chain, tx)
    w3 = tx.w3
    w3.provider.make_request("evm_setAutomine", [False])
    try:
        assert guard().claimed, "the claim is sent"
        (key,) = _x402_keys(x402_node)
        assert guard().claimed == (), "nothing new while it is pending"
        now[0] += 31  # priced out for longer than bump_after_s
        assert guard().claimed == ()
        stuck = tx.store.load(key)
        assert stuck is not None and len(stuck.attempts) == 2, "the next tick re-signed it with higher fees"
        assert stuck.attempts[1].max_fee_per_gas > stuck.attempts[0].max_fee_per_gas
        w3.provider.make_request("evm_mine", [])
    finally:
        w3.provider.make_request("evm_setAutomine", [True])
    landed = tx.poll(key)
    assert landed.state in (TxState.MINED, TxState.FINAL) and landed.mined_hash == stuck.attempts[1].tx_hash
    assert x402_node.world.chain.channel(channel).total_claimed == charged


def test_the_epochs_sweep_waits_for_its_claim_to_be_mined(x402_node: X402Node, roles: Roles) -> None:
    """Before a settle: the claim is an intent; until it is mined the sweep answers NOT_YET (the epoch stays
    built, its preflight would find the escrow account short), then nothing more is sent for it."""
    payer = Payer(roles.payer, x402_node.world.rpc_url, x402_node.world.dep.chain_id)
    first, charged = x402_node.serve(payer, Usage(20, 10))
    lane = x402_node.x402.book.find_lane(first.voucher.channel_id)
    router = x402_node.world.terms.router
    voucher = SignedVoucher(router, x402_node.tx.sender, lane, charged, b"\x01" * 32, 2**63 - 1, b"\x02" * 65)
    row = SettlementEpoch(node=x402_node.tx.sender, epoch_id=1, batch={"vouchers": [voucher.to_json()],
                                                                        "amounts": [str(charged)]})
    sweep = X402Sweep(x402_node.factory, x402_node.world.chain, x402_node.world.dep.settlement, x402_node.tx)
    w3 = x402_node.tx.w3
    w3.provider.make_request("evm_setAutomine", [False])
    try:
        assert sweep(row) is NOT_YET, "sent, not mined"
        assert sweep(row) is NOT_YET and len(_x402_keys(x402_node)) == 1, "polled, not sent again"
        w3.provider.make_request("evm_mine", [])
        assert sweep(row) is None, "mined: the settle may go"
    finally:
        w3.provider.make_request("evm_setAutomine", [True])
    assert x402_node.world.chain.channel(first.voucher.channel_id).total_claimed == charged
    assert x402_node.escrowed() == charged, "claimed and swept into the router's escrow account"
    assert len(_claim_keys(x402_node)) == 1, "one transaction"


def test_a_payer_served_every_tick_cannot_starve_an_epochs_sweep(x402_node: X402Node, roles: Roles,
                                                                 anvil: object) -> None:
    """An attacker keeps a withdrawal pending and is served once more before every tick: each tick the guard
    has a claim to send. Were the guard to send first, the epoch's own claim would wait behind a new one at
    every tick and the settle (every payer's money in it) would never go. The guard runs after the epochs."""
    from node.chain.contract_client import ContractClient
    from node.chain.contracts import Contracts
    from node.db.models import EpochState
    from node.settlement.policy import EpochPolicy
    from node.settlement.service import SettlementService

    world, w3 = x402_node.world, x402_node.tx.w3
    attacker_key = anvil.keys[9]  # type: ignore[attr-defined]
    token = world.deployer.contract("DemoToken3009", world.dep.token)
    world.deployer.transact(token.functions.mint(ContractClient(world.rpc_url, attacker_key).address, 10**18))
    victim = Payer(roles.payer, world.rpc_url, world.dep.chain_id)
    paid, charged = x402_node.serve(victim, Usage(20, 10))
    attacker = Payer(attacker_key, world.rpc_url, world.dep.chain_id)
    channel, _ = x402_node.serve(attacker, Usage(1, 1))
    x402_node.payer_call(attacker_key, "initiateWithdraw", channel, 1)
    drain(x402_node.indexer)
    lane = x402_node.x402.book.find_lane(paid.voucher.channel_id)
    voucher = SignedVoucher(world.terms.router, x402_node.tx.sender, lane, charged, b"\x01" * 32, 2**63 - 1,
                            b"\x02" * 65)
    with x402_node.factory.begin() as session:  # an epoch built with the victim's channel, waiting for its sweep
        batch = {"vouchers": [voucher.to_json()], "amounts": [str(charged)], "attempt": 0}
        session.add(SettlementEpoch(node=x402_node.tx.sender.lower(), epoch_id=1, state=EpochState.BUILT,
                                    rewards_root="0x" + "11" * 32, rewards_total=charged,
                                    receipts_root="0x" + "22" * 32, receipt_count=1, batch=batch))
    sweep = X402Sweep(x402_node.factory, world.chain, world.dep.settlement, x402_node.tx)
    service = SettlementService(x402_node.factory, Contracts.connect(w3, world.dep, roles.node), x402_node.tx,
                                EpochPolicy(max_age_s=10**9), before_send=sweep, on_tick=x402_node.guard)
    for _ in range(3):
        w3.provider.make_request("evm_setAutomine", [False])
        try:
            service.tick()
            w3.provider.make_request("evm_mine", [])
        finally:
            w3.provider.make_request("evm_setAutomine", [True])
        x402_node.serve(attacker, Usage(1, 1))  # charged again, its withdrawal still pending: due again
        drain(x402_node.indexer)
    assert world.chain.channel(paid.voucher.channel_id).total_claimed == charged, "the epoch's own claim went out"
