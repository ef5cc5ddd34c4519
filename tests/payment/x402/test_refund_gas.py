"""The node's gasless transactions on a channel are paid for by that channel's fees (docs/x402.md, "Money
rules"): a payer looping gasless deposit, one cheapest request, gasless refund of everything used to cost
the node about 212k gas a cycle for 110 token units charged (docs/x402.md, "Limits"). With `token_per_eth`,
a gasless refund is granted only once what the channel was charged covers the gas the node spent on it
(its deposits, its refunds, this one), at the current gas price; the refusal names the payer's own way
out and how much more it would need to be charged. Real anvil, the SDK as the payer, its refunds relayed
by the gas key as the API sends them."""

from __future__ import annotations

import base64
import json
from types import SimpleNamespace

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.exc import OperationalError
from x402.mechanisms.evm.batch_settlement.client.refund import RefundOptions, _RefundResponse

from node.api.error_handlers import install_error_handlers
from node.api.routes import x402_refund
from node.payment.service import Usage
from node.payment.x402.channel_check import X402Refused
from node.payment.x402.facilitator import Facilitator, erc20_balance_of
from node.payment.x402.gas_cover import GAS_NOT_COVERED, REFUND_GAS, GasCover
from node.payment.x402.refund import X402Refunds
from node.payment.x402.wire import decode_header, payment_response
from tests.fixtures import x402_chain_node as fixtures
from tests.fixtures.contracts import Roles
from tests.fixtures.x402_chain_node import X402Node
from tests.payment.x402.sdk import PRICE, Payer
from tests.payment.x402.test_refund import URL, _http, _refunds, _relayed

pytestmark = pytest.mark.chain
anvil, roles, x402_node = fixtures.anvil, fixtures.roles, fixtures.x402_node
ETH = 10**18
GAS_PRICE = 10**9  # wei: the chain's gas price as the node reads it in these tests
TOKEN_PER_ETH = 10**7  # so one gas is worth 0.01 token unit: a deposit and a refund ~2,100 units
CHEAPEST = Usage(1, 1)  # 110 token units


def _tokens(gas: int) -> int:
    return -(-gas * GAS_PRICE * TOKEN_PER_ETH // ETH)


def _node_gas(node: X402Node, roles: Roles, since_block: int) -> int:
    """Gas of every transaction the node's keys sent since `since_block`: deposits (the node key, in these
    tests) and refunds (the gas key), read from the chain's receipts."""
    w3, senders = node.world.deployer.w3, {Roles.address(roles.node), Roles.address(roles.relayer)}
    total = 0
    for number in range(since_block + 1, w3.eth.block_number + 1):
        for tx in w3.eth.get_block(number, full_transactions=True)["transactions"]:
            if tx["from"] in senders:
                total += int(w3.eth.get_transaction_receipt(tx["hash"])["gasUsed"])
    return total


def _gas_refunds(node: X402Node, roles: Roles, refused: list[X402Refused]) -> X402Refunds:
    """The API's refunds (relayed by the gas key) with `token_per_eth` set; each refusal kept in `refused`."""
    refunds = _refunds(node, _relayed(node, roles))
    refunds.gas = GasCover(TOKEN_PER_ETH, lambda: GAS_PRICE)
    answer = refunds.refund

    def refund(header: str) -> dict[str, object]:
        try:
            return answer(header)
        except X402Refused as exc:
            refused.append(exc)
            raise
    refunds.refund = refund  # type: ignore[method-assign]
    return refunds


def test_looping_gasless_deposit_cheap_request_and_refund_never_makes_the_node_pay_more_gas_than_it_charged(
        x402_node: X402Node, roles: Roles) -> None:
    payer = Payer(roles.payer, x402_node.world.rpc_url, x402_node.world.dep.chain_id)
    w3, refused = x402_node.world.deployer.w3, []
    start, fetch = w3.eth.block_number, _http(x402_node, _gas_refunds(x402_node, roles, refused))
    granted, gave_up, charged = [], 0, 0
    for _ in range(3):
        first, charged = x402_node.serve(payer, CHEAPEST)
        try:
            assert payer.scheme.refund(URL, RefundOptions(fetch=fetch)).success
        except RuntimeError:  # the SDK gives up on the node's refusal (after asking again once)
            gave_up += 1
            continue
        granted.append((charged, _node_gas(x402_node, roles, start)))
    uncovered = [(c, gas, _tokens(gas)) for c, gas in granted if _tokens(gas) > c]
    assert not uncovered, f"refunds granted while the node's gas outran the channel's fees (charged, gas, " \
                          f"its worth): {uncovered}"
    assert charged == 3 * 110 and gave_up == 3 and {r.reason for r in refused} == {GAS_NOT_COVERED}
    deposit_gas = _node_gas(x402_node, roles, start)  # the payer's one deposit: no refund, no deposit again
    assert x402_node.x402.book.node_gas(first.voucher.channel_id) == deposit_gas
    assert "initiateWithdraw" in refused[-1].message and "finalizeWithdraw" in refused[-1].message
    short_by = int(refused[-1].facts["short_by"])
    assert short_by == _tokens(deposit_gas + REFUND_GAS) - charged

    while charged < 330 + short_by:  # what the refusal said would do: charged, then the refund goes out
        _, charged = x402_node.serve(payer, Usage(100, 20))
    seen = len(refused)
    out = payer.scheme.refund(URL, RefundOptions(fetch=fetch))
    assert out.success and len(refused) == seen
    spent = _node_gas(x402_node, roles, start)
    assert _tokens(spent) <= charged, f"the node spent {spent} gas ({_tokens(spent)} units), charged {charged}"
    assert x402_node.x402.book.node_gas(first.voucher.channel_id) >= spent, "the refund counted at most its estimate"


def test_an_honest_agent_with_many_requests_gets_its_gasless_refunds_part_then_the_rest(
        x402_node: X402Node, roles: Roles) -> None:
    payer = Payer(roles.payer, x402_node.world.rpc_url, x402_node.world.dep.chain_id)
    w3, refused = x402_node.world.deployer.w3, []
    start, fetch = w3.eth.block_number, _http(x402_node, _gas_refunds(x402_node, roles, refused))
    first, charged = x402_node.serve(payer, Usage(100, 20))
    for _ in range(3):
        _, charged = x402_node.serve(payer, Usage(100, 20))
    who, deposit = first.config.payer, first.deposit.amount
    before = x402_node.balance_of(who)
    assert payer.scheme.refund(URL, RefundOptions(amount="1000", fetch=fetch)).success
    rest = payer.scheme.refund(URL, RefundOptions(fetch=fetch))  # the first's surplus of fees carries over
    assert rest.success and not refused
    assert x402_node.balance_of(who) - before == deposit - charged, "everything not charged, to the wei"
    spent = _node_gas(x402_node, roles, start)
    assert _tokens(spent) <= charged, f"the node spent {spent} gas ({_tokens(spent)} units), charged {charged}"
    print(f"honest: charged {charged}, node gas {spent} ({_tokens(spent)} units at {GAS_PRICE} wei/gas, "
          f"{TOKEN_PER_ETH} units/ETH)")


def test_a_deposit_through_the_facilitator_alone_then_a_gasless_refund_is_refused_until_charged(
        x402_node: X402Node, roles: Roles) -> None:
    """`POST /x402/settle` submits a deposit with no request at all (the node's gas), and a refund at a
    charged total of 0 returned it all (a fresh channel, a new salt, each time): the facilitator's deposits
    are counted against the channel like the paid path's."""
    facilitator = Facilitator(x402_node.world.terms, x402_node.world.chain,
                              erc20_balance_of(x402_node.world.chain.client),
                              submit_deposit=x402_node.x402.submit_deposit_once)
    payer = Payer(roles.payer, x402_node.world.rpc_url, x402_node.world.dep.chain_id)
    w3, refused = x402_node.world.deployer.w3, []
    refunds = _gas_refunds(x402_node, roles, refused)
    start, fetch = w3.eth.block_number, _http(x402_node, refunds)
    header, payment = payer.pay(x402_node.world.required())
    payload = json.loads(base64.b64decode(header))
    settled = facilitator.settle({"x402Version": 2, "paymentPayload": payload,
                                  "paymentRequirements": payload["accepted"]})
    assert settled["success"], settled
    channel = payment.voucher.channel_id
    assert x402_node.x402.book.node_gas(channel) == _node_gas(x402_node, roles, start) > 0
    state = {**settled["extra"]["channelState"], "chargedCumulativeAmount": "0"}  # as a resource server tells it
    payer.answered(payment, payment_response(x402_node.world.terms.network, payment.config.payer, 0, state,
                                             transaction=settled["transaction"], amount=settled["amount"]), 0)
    with pytest.raises(RuntimeError, match="402"):
        payer.scheme.refund(URL, RefundOptions(fetch=fetch))
    assert x402_node.world.chain.channel(channel).refund_nonce == 0, "nothing refunded"
    assert refused and {r.reason for r in refused} == {GAS_NOT_COVERED}
    assert int(refused[-1].facts["charged"]) == 0

    refunds.gas = None  # no token_per_eth: as before, the deposit comes back gasless, no request ever paid
    out = payer.scheme.refund(URL, RefundOptions(fetch=fetch))
    assert out.success and int(out.amount) == payment.deposit.amount


def test_the_route_tells_the_payer_how_much_more_and_its_own_way_out(x402_node: X402Node, roles: Roles) -> None:
    """`GET /x402/refund` as the SDK calls it: the refusal's 402 names the reason in PAYMENT-REQUIRED and
    the figures in `error.details`."""
    app = FastAPI()
    app.state.services = SimpleNamespace(x402_refunds=_gas_refunds(x402_node, roles, []))
    install_error_handlers(app)
    app.include_router(x402_refund.router)
    http = TestClient(app)
    payer = Payer(roles.payer, x402_node.world.rpc_url, x402_node.world.dep.chain_id)
    _, charged = x402_node.serve(payer, CHEAPEST)
    answers = []

    def fetch(url: str, headers: dict[str, str]) -> _RefundResponse:
        resp = http.get("/x402/refund", headers=headers)
        answers.append(resp)
        return _RefundResponse(resp.status_code, dict(resp.headers))
    with pytest.raises(RuntimeError) as raised:
        payer.scheme.refund("http://testserver/x402/refund", RefundOptions(fetch=fetch))
    # the SDK's own error names the reason, the figure and the way out (a failed PAYMENT-RESPONSE), asked once
    assert GAS_NOT_COVERED in str(raised.value) and "initiateWithdraw" in str(raised.value), raised.value
    assert len(answers) == 2, "the probe, then the refund once: the refusal is final to the SDK"
    refused = answers[-1]
    assert refused.status_code == 402
    assert decode_header(refused.headers["PAYMENT-REQUIRED"])["error"] == GAS_NOT_COVERED
    error = refused.json()["error"]
    details = error["details"]
    assert details["reason"] == GAS_NOT_COVERED and int(details["charged"]) == charged
    assert int(details["short_by"]) == int(details["gas_cost"]) - charged > 0
    assert details["withdraw_delay_s"] == x402_node.world.terms.withdraw_delay_s
    assert "initiateWithdraw" in error["message"] and details["short_by"] in error["message"]


def test_a_refund_sent_whose_gas_count_fails_keeps_its_channel_held_until_mirrored(
        x402_node: X402Node, roles: Roles, monkeypatch: pytest.MonkeyPatch) -> None:
    """Counting the refund's gas is a write after its transaction is mined: a database that fails that write
    (then answers again) must not free the channel before the mirror shows the refund, or a request is held
    on a balance the refund already returned (served on tokens that left the channel). Before, the failed
    count left the refund without its transaction's hash, and the refund dropped its hold at once."""
    payer = Payer(roles.payer, x402_node.world.rpc_url, x402_node.world.dep.chain_id)
    x402_node.serve(payer, Usage(20, 10))
    header, payment = payer.pay(x402_node.world.required())

    def fails_once(*_: object) -> None:
        monkeypatch.undo()
        raise OperationalError("UPDATE x402_channels SET node_gas", {}, ConnectionError("server closed the connection"))
    monkeypatch.setattr(x402_node.x402.book, "add_gas", fails_once)
    stuck = X402Refunds(x402_node.x402, x402_node.world.chain.channel, x402_node.world.chain.refund,
                        lambda channel, nonce: False, mirror_wait_s=0.1)
    with pytest.raises(OperationalError):
        payer.scheme.refund(URL, RefundOptions(fetch=_http(x402_node, stuck)))
    channel = payment.voucher.channel_id
    assert x402_node.world.chain.channel(channel).refund_nonce == 1, "the refund went out"
    with pytest.raises(X402Refused) as busy:  # not mirrored yet: the channel stays held (its TTL)
        x402_node.x402.hold(x402_node.x402.check(header), PRICE)
    assert busy.value.reason.endswith("channel_busy")
