"""A deposit a reorg removes: the node serves against an x402 deposit once mined (the SDK sends the deposit
with the request it pays), so a payer whose deposit a reorg drops, and who spends its tokens elsewhere in
the new blocks, keeps whatever it was served. The node bounds that: what a channel is charged beyond its
final balance stays within one request's price or the node's credit on deposits not final yet
(`X402Terms.unfinal_credit`); past it the payer waits for finality (docs/x402.md, "The channel mirror")."""

from __future__ import annotations

from dataclasses import replace

import pytest
from eth_account import Account

from node.payment.service import Usage
from node.payment.x402.channel_check import NOT_FINAL, X402Refused
from tests.fixtures import x402_chain_node as fixtures
from tests.fixtures.contracts import Roles
from tests.fixtures.indexer import drain
from tests.fixtures.x402_chain_node import X402Node
from tests.payment.x402 import conftest
from tests.payment.x402.sdk import Payer

pytestmark = pytest.mark.chain
anvil, roles, x402_node, x402_world = fixtures.anvil, fixtures.roles, fixtures.x402_node, conftest.x402_world
CREDIT = 5_000  # each request's ceiling is 3,000 (PRICE) and costs 1,200: two are served before finality


def _serve_until_refused(node: X402Node, payer: Payer, limit: int = 20) -> tuple[int, X402Refused | None]:
    """Serve `Usage(20, 10)` requests (1,200 each) until the node refuses one: (charged total, the refusal)."""
    charged = 0
    for _ in range(limit):
        try:
            _, charged = node.serve(payer, Usage(20, 10))
        except X402Refused as refused:
            return charged, refused
    return charged, None


def test_a_deposit_a_reorg_removes_costs_the_node_at_most_its_credit(x402_node: X402Node, roles: Roles) -> None:
    """The attack: deposit (the node submits it), be served as much as the deposit covers, then a reorg
    replaces the deposit's block (and the SDK's top-ups after it) with the payer's transfer of all its tokens
    away. Before: the node served all 20 requests (24,000) and the chain gave it nothing to claim."""
    x402_node.x402.terms = replace(x402_node.x402.terms, unfinal_credit=CREDIT)
    world, w3 = x402_node.world, x402_node.world.chain.client.w3
    payer = Payer(roles.payer, world.rpc_url, world.dep.chain_id)
    deposited_at = w3.eth.block_number + 1
    charged, refused = _serve_until_refused(x402_node, payer)  # the SDK tops the deposit up as it goes
    drain(x402_node.indexer)

    payer_address = Account.from_key(roles.payer).address
    token = world.deployer.contract("DemoToken3009", world.dep.token)
    before = token.functions.balanceOf(payer_address).call(block_identifier=deposited_at - 1)
    away = token.functions.transfer(roles.address(roles.treasury), before)  # all it held before the deposit
    tx = away.build_transaction({"from": payer_address, "nonce": w3.eth.get_transaction_count(payer_address),
                                 "chainId": world.dep.chain_id, "gas": 200_000, "gasPrice": w3.eth.gas_price * 2})
    raw = Account.sign_transaction(tx, roles.payer).raw_transaction.to_0x_hex()
    assert w3.provider.make_request("anvil_reorg", [w3.eth.block_number - deposited_at + 1, [[raw, 0]]])
    drain(x402_node.indexer)

    channel = world.chain.channel(_channel_id(x402_node, payer))
    assert channel.balance == 0, "the reorg removed the deposit: nothing for the node to claim"
    assert x402_node.balance_of(payer_address) == 0, "and the payer's tokens went elsewhere"
    assert 0 < charged <= CREDIT, f"the node served {charged} against a deposit a reorg removed (credit {CREDIT})"
    assert refused is not None and refused.reason == NOT_FINAL, refused


def _channel_id(node: X402Node, payer: Payer) -> bytes:
    _, payment = payer.pay(node.world.required())
    return payment.voucher.channel_id


def test_an_honest_payer_is_served_at_once_and_again_once_its_deposit_is_final(x402_node: X402Node,
                                                                                 roles: Roles) -> None:
    """What an honest agent sees: its deposit pays its first request at once (and the next within the
    credit); past the credit a 402 `..._deposit_not_final`, which the SDK pays again with a voucher, no new
    deposit; once the deposit is final it pays in full, and the SDK's top-up deposit counts as the first did."""
    x402_node.x402.terms = replace(x402_node.x402.terms, unfinal_credit=CREDIT)
    payer = Payer(roles.payer, x402_node.world.rpc_url, x402_node.world.dep.chain_id)
    charged, refused = _serve_until_refused(x402_node, payer)
    assert charged == 2 * 1_200 and refused is not None and refused.reason == NOT_FINAL
    _, payment = payer.pay(x402_node.world.required())
    assert payment.deposit is None, "the SDK pays the refused request again with a voucher: no second deposit"

    w3 = x402_node.world.chain.client.w3
    w3.provider.make_request("anvil_mine", [hex(x402_node.indexer.config.finality_depth + 1)])
    drain(x402_node.indexer)
    charged, refused = _serve_until_refused(x402_node, payer)
    assert refused is not None and refused.facts["final_balance"] == "15000", "the first deposit is final now"
    assert charged == 15 * 1_200 and refused.reason == NOT_FINAL, \
        "served on the final 15,000; the SDK's top-up deposit (from 13,200 on) pays within the credit again"
