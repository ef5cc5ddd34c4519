"""A settle capped at what its epoch collects must not hold the guard's claim behind its nonce.

Past its cap (`gas_budget_wei`, with `token_per_eth` set) a settle waits in the pool with its nonce, and
every later transaction of the operator key waits behind it: the x402 guard's claim of a withdrawing
channel too. The attack: during a gas spike that prices a small epoch's settle out, a payer who was
charged a lot asks to withdraw; its claim is stuck behind the settle until the delay passes, and the
payer walks away with what it was charged. Now a settle at its cap that cannot land at the base fee of
the moment, with a claim waiting behind it, has its nonce re-signed as a no-op (21,000 gas, priced for
the spike): the claim lands, and the epoch is rebuilt later (its receipts wait, nothing lost).
Real anvil, contracts, indexer, ledger, guard and settlement."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from node.chain.anvil import Anvil
from node.chain.contract_client import ContractClient
from node.chain.contracts import EMPTY_LINEAGE_HASH, Contracts
from node.chain.tx_manager import FeePolicy, TxState
from node.chain.x402_channels import X402Chain
from node.db.models import EpochState
from node.payment.service import Usage
from node.payment.x402.wire import Payment
from node.protocol.receipt import Receipt, SignedReceipt, adapter_id_bytes
from node.settlement.outbox import intent_key
from node.settlement.policy import LANE_GAS, SETTLE_BASE_GAS, EpochPolicy
from node.settlement.service import SettlementService
from node.settlement.x402_sweep import X402Sweep
from tests.fixtures import x402_chain_node as fixtures
from tests.fixtures.contracts import Roles
from tests.fixtures.indexer import drain
from tests.fixtures.x402_chain_node import X402Node
from tests.payment.x402 import conftest
from tests.payment.x402.sdk import PRICE, Payer

pytestmark = [pytest.mark.chain, pytest.mark.slow]
anvil, roles, x402_node, x402_world = fixtures.anvil, fixtures.roles, fixtures.x402_node, conftest.x402_world
ETH = 10**18
SPIKE = 30


def _rpc(node: X402Node, method: str, *params: object) -> None:
    node.tx.w3.provider.make_request(method, list(params))  # type: ignore[arg-type]


def _serve(node: X402Node, payer: Payer, usage: Usage) -> tuple[Payment, int]:
    """One paid request to the base model (adapter 0: no lineage for the mirror to hold); (payment, charged)."""
    header, payment = payer.pay(node.world.required())
    hold = node.x402.hold(node.x402.check(header), PRICE, request=b"")

    def issue(fee: int) -> SignedReceipt:
        fields = Receipt(hold.checked.digest, adapter_id_bytes(0), 0, EMPTY_LINEAGE_HASH, usage.prompt_tokens,
                         usage.completion_tokens, fee, b"\xcd" * 32, 1)
        return SignedReceipt(fields, hold.checked.digest, b"\x11" * 65, node.x402.payments.node)

    total, _ = node.x402.payments.finish(hold, usage, issue, lambda r: {"receipt": r})
    payer.answered(payment, node.x402.payment_response(hold, total))
    return payment, total


def _beat(node: X402Node, service: SettlementService, base_fee: int) -> EpochState | None:
    """One block at `base_fee`, the indexer caught up, then one worker tick."""
    _rpc(node, "anvil_setNextBlockBaseFeePerGas", hex(base_fee))
    _rpc(node, "evm_mine")
    drain(node.indexer)
    return service.tick()


@dataclass
class Scene:
    service: SettlementService
    small: Payment  # the epoch's payer
    small_fee: int
    leaver: Payment  # served after the epoch was sent, then withdraws all its deposit
    charged: int
    normal: int  # the base fee before the spike


def _scene(node: X402Node, roles: Roles, anvil: Anvil, times: int, spike: int, before: int) -> Scene:
    """An epoch that pays for its settle `times` over at today's price is sent; the base fee goes to `spike`
    times the gas price; after `before` blocks of it a payer charged a lot asks to withdraw, and the worker
    ticks through 10 more blocks of the spike."""
    world, w3 = node.world, node.tx.w3
    gas_key = anvil.keys[8]  # deposits are sent by the x402 gas key, never an operator nonce (api/wiring.py)
    node.x402.submit_deposit = X402Chain(ContractClient(world.rpc_url, gas_key), world.terms.router).deposit
    small, small_fee = _serve(node, Payer(roles.payer, world.rpc_url, world.dep.chain_id), Usage(1, 1))
    gas_price = int(w3.eth.gas_price)
    token_per_eth = small_fee * ETH // (times * (SETTLE_BASE_GAS + LANE_GAS) * gas_price)
    node.tx.policy = FeePolicy(confirmations=1, bump_after_s=0)  # a bump every tick: a cap is soon reached
    node.guard.token_per_eth = token_per_eth  # a claim is sent only when worth its gas, as in production
    sweep = X402Sweep(node.factory, world.chain, world.dep.settlement, node.tx)
    service = SettlementService(node.factory, Contracts.connect(w3, world.dep, roles.node), node.tx,
                                EpochPolicy(max_age_s=0, token_per_eth=token_per_eth), before_send=sweep,
                                on_tick=node.guard)
    normal = int(w3.eth.get_block("latest")["baseFeePerGas"])
    leaver_key = anvil.keys[9]
    _rpc(node, "evm_setAutomine", False)
    try:
        for _ in range(10):  # closed, built, swept, sent: in the pool, priced for today's base fee
            if _beat(node, service, normal) is EpochState.SUBMITTED:
                break
        assert service.state(1) is EpochState.SUBMITTED
        for _ in range(before):
            _beat(node, service, gas_price * spike)

        token = world.deployer.contract("DemoToken3009", world.dep.token)
        _rpc(node, "evm_setAutomine", True)  # the payer's own transactions land as it sends them
        _rpc(node, "anvil_setNextBlockBaseFeePerGas", hex(gas_price * spike))
        world.deployer.transact(token.functions.mint(ContractClient(world.rpc_url, leaver_key).address, 10**18))
        payer = Payer(leaver_key, world.rpc_url, world.dep.chain_id)
        leaver, charged = _serve(node, payer, Usage(20, 25))  # a big charge, after the epoch closed
        for _ in range(2):
            _, charged = _serve(node, payer, Usage(20, 25))
        node.payer_call(leaver_key, "initiateWithdraw", leaver, leaver.deposit.amount)
        _rpc(node, "evm_setAutomine", False)
        drain(node.indexer)
        assert node.guard.due(), "the leaver's withdrawal could take its charge: the guard claims it"
        for _ in range(10):  # the spike goes on: the guard's claim is sent
            _beat(node, service, gas_price * spike)
    finally:
        _rpc(node, "evm_setAutomine", True)
    return Scene(service, small, small_fee, leaver, charged, normal)


def _walks_away_with(node: X402Node, anvil: Anvil, scene: Scene) -> tuple[int, int]:
    """The delay passes and the leaver finishes its withdrawal: (what was claimed by then, what it got)."""
    node.wait_out_the_delay()
    leaver = scene.leaver
    claimed = node.world.chain.channel(leaver.voucher.channel_id).total_claimed
    before = node.balance_of(leaver.config.payer)
    node.payer_call(anvil.keys[9], "finalizeWithdraw", leaver)
    return claimed, node.balance_of(leaver.config.payer) - before


def test_a_capped_settle_does_not_hold_the_guards_claim_past_the_withdraw_delay(x402_node: X402Node, roles: Roles,
                                                                                anvil: Anvil) -> None:
    scene = _scene(x402_node, roles, anvil, times=2, spike=30, before=10)  # the settle waits at its cap
    claimed, walked_away = _walks_away_with(x402_node, anvil, scene)
    assert claimed == scene.charged, f"claimed {claimed} of {scene.charged} before the delay ended"
    assert walked_away == scene.leaver.deposit.amount - scene.charged, "the leaver got back only the rest"

    channel = x402_node.world.chain.channel
    for _ in range(20):  # the spike is over: the small epoch's receipts, which waited, are collected
        _beat(x402_node, scene.service, scene.normal)
        if channel(scene.small.voucher.channel_id).total_claimed == scene.small_fee and scene.service.state(
                1) is EpochState.FINAL and scene.service.state(2) in (None, EpochState.FINAL):
            break
    assert channel(scene.small.voucher.channel_id).total_claimed == scene.small_fee, "nothing lost"
    assert x402_node.escrowed() == 0, "every claimed charge went out in a settle"


def test_a_settle_that_pays_for_the_spike_is_never_cancelled_for_a_claim(x402_node: X402Node, roles: Roles,
                                                                         anvil: Anvil) -> None:
    """An honest epoch: its bumps catch up with the spike (it pays for its settle 20 times over at today's
    price) while a claim waits behind it. It is not cancelled: it lands, then the claim."""
    scene = _scene(x402_node, roles, anvil, times=20, spike=4, before=1)
    record = x402_node.tx.store.load(intent_key(x402_node.tx.sender, 1))
    assert record is not None and record.state in (TxState.MINED, TxState.FINAL)
    assert not any(a.is_cancel for a in record.attempts), "the honest settle was never replaced by a no-op"
    assert scene.service.state(1) in (EpochState.CONFIRMED, EpochState.FINAL)
    claimed, _ = _walks_away_with(x402_node, anvil, scene)
    assert claimed == scene.charged
