"""The cooperative refund, asked by the `x402` SDK's own `refund()` (a client nobody here wrote) and served
by the node as its facilitator: the charge is claimed with the refund voucher and the rest returned in one
transaction, to the wei; a refund voucher below the charge is refused (the SDK resyncs through the
corrective 402 and the refund then claims the whole charge); no refund runs while a request holds the
channel, and no request is served while a refund runs. The SDK's HTTP is replaced by a function that
hands its headers to the node's service (the route is the API's; docs/x402.md)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from types import SimpleNamespace

import pytest
from eth_account import Account
from eth_utils import keccak
from fastapi import FastAPI
from fastapi.testclient import TestClient
from x402.mechanisms.evm.batch_settlement.client.refund import RefundOptions, _RefundResponse
from x402.mechanisms.evm.batch_settlement.errors import ERR_REFUND_AMOUNT_INVALID

from node.api.error_handlers import install_error_handlers
from node.api.routes import x402_refund
from node.chain.contract_client import ContractClient
from node.chain.receipt_read import sign_read
from node.chain.x402_channels import X402Chain
from node.errors import ChainError, NotThePayer, VoucherConflict
from node.payment.service import Usage
from node.payment.x402.channel_check import X402Refused
from node.payment.x402.channel_mirror import ChannelMirror
from node.payment.x402.facilitator import Facilitator, erc20_balance_of
from node.payment.x402.refund import BELOW_MIN_DEPOSIT, X402Refunds
from node.payment.x402.replay import as_sent
from node.payment.x402.terms import CUMULATIVE_MISMATCH, payment_required
from node.payment.x402.wire import PAYMENT_SIGNATURE_HEADER, decode_header, encode_header
from node.protocol.hexstr import to_hex
from tests.fixtures import x402_chain_node as fixtures
from tests.fixtures.contracts import Roles
from tests.fixtures.x402_chain_node import DELAY, X402Node
from tests.payment.x402.sdk import PRICE, Payer
from tests.payment.x402.test_service import _serve

pytestmark = pytest.mark.chain
anvil, roles, x402_node = fixtures.anvil, fixtures.roles, fixtures.x402_node
URL = "http://node.test/x402/refund"


def _refunds(node: X402Node, chain: X402Chain | None = None) -> X402Refunds:
    mirror = ChannelMirror(node.factory, DELAY)
    chain = chain or node.world.chain

    def mirrored(channel: bytes, nonce: int) -> bool:
        node.catch_up()
        return mirror.has_refund(channel, nonce)
    return X402Refunds(node.x402, chain.channel, chain.refund, mirrored, mirror_wait_s=10)


def _relayed(node: X402Node, roles: Roles) -> X402Chain:
    """As the API sends refunds: from its gas key, with the node's (receiver authorizer's) signatures."""
    return X402Chain(ContractClient(node.world.rpc_url, roles.relayer), node.world.terms.router,
                     authorizer_key=roles.node)


def _http(node: X402Node, refunds: X402Refunds) -> Callable[[str, dict[str, str]], _RefundResponse]:
    """The node's answers to the SDK's refund requests, as its HTTP would send them."""
    def fetch(url: str, headers: dict[str, str]) -> _RefundResponse:
        header = headers.get(PAYMENT_SIGNATURE_HEADER)
        if header is None:
            return _required(node, None)
        try:
            return _RefundResponse(200, {"PAYMENT-RESPONSE": encode_header(refunds.refund(header))})
        except X402Refused as refused:
            return _required(node, refused)
    return fetch


def _required(node: X402Node, refused: X402Refused | None) -> _RefundResponse:
    states = {"channel_state": refused.channel_state, "voucher_state": refused.voucher_state} if refused else {}
    required = payment_required(URL, [node.world.terms.requirements(PRICE, **states)],
                                refused.reason if refused else None)
    return _RefundResponse(402, {"PAYMENT-REQUIRED": encode_header(required)})


@pytest.mark.parametrize("relayed", [False, True], ids=["authorizer", "gas-key"])
def test_the_sdk_refunds_part_then_the_rest_and_the_charge_stays_claimed(x402_node: X402Node, roles: Roles,
                                                                         relayed: bool) -> None:
    payer = Payer(roles.payer, x402_node.world.rpc_url, x402_node.world.dep.chain_id)
    first, _ = x402_node.serve(payer, Usage(20, 10))
    _, charged = x402_node.serve(payer, Usage(10, 5))
    channel, deposit, who = first.voucher.channel_id, first.deposit.amount, first.config.payer
    refunds = _refunds(x402_node, _relayed(x402_node, roles) if relayed else None)
    fetch, start = _http(x402_node, refunds), x402_node.balance_of(who)

    part = payer.scheme.refund(URL, RefundOptions(amount="5000", fetch=fetch))
    assert part.success and part.transaction and part.amount == "5000"
    sender = x402_node.world.deployer.w3.eth.get_transaction(part.transaction)["from"]
    assert sender == Roles.address(roles.relayer if relayed else roles.node)
    on_chain = x402_node.world.chain.channel(channel)
    assert (on_chain.total_claimed, on_chain.balance, on_chain.refund_nonce) == (charged, deposit - 5_000, 1)
    assert part.extra["channelState"]["balance"] == str(deposit - 5_000)

    rest = payer.scheme.refund(URL, RefundOptions(fetch=fetch))
    assert rest.success and int(rest.amount) == deposit - 5_000 - charged
    on_chain = x402_node.world.chain.channel(channel)
    assert on_chain.balance == on_chain.total_claimed == charged, "only the charge stays, claimed"
    assert x402_node.balance_of(who) - start == deposit - charged, "the payer got everything else, to the wei"
    with pytest.raises(RuntimeError, match="no remaining balance"):
        payer.scheme.refund(URL, RefundOptions(fetch=fetch))

    x402_node.world.chain.sweep()  # what the epoch's sweep does: the claimed charge reaches the node's pot
    assert x402_node.escrowed() == charged


def test_a_refund_voucher_below_the_charge_is_refused_and_the_sdk_resyncs(x402_node: X402Node,
                                                                          roles: Roles) -> None:
    payer = Payer(roles.payer, x402_node.world.rpc_url, x402_node.world.dep.chain_id)
    first, charged = x402_node.serve(payer, Usage(20, 10))
    key = "0x" + first.voucher.channel_id.hex()
    state = payer.scheme._storage.get(key)
    state.charged_cumulative_amount = "1"  # the client claims it was charged 1: it would refund the rest
    payer.scheme._storage.set(key, state)
    refunds = _refunds(x402_node)
    seen: list[str] = []

    def watching(url: str, headers: dict[str, str]) -> _RefundResponse:
        answer = _http(x402_node, refunds)(url, headers)
        seen.append(f"{answer.status}")
        return answer
    out = payer.scheme.refund(URL, RefundOptions(fetch=watching))
    assert seen == ["402", "402", "200"], "probe, refused below the charge, then the resynced voucher"
    assert out.success and x402_node.world.chain.channel(first.voucher.channel_id).total_claimed == charged


def test_no_refund_while_a_request_holds_the_channel_and_no_request_during_a_refund(
        x402_node: X402Node, roles: Roles) -> None:
    payer = Payer(roles.payer, x402_node.world.rpc_url, x402_node.world.dep.chain_id)
    first, _ = x402_node.serve(payer, Usage(20, 10))
    header, _ = payer.pay(x402_node.world.required())
    hold = x402_node.x402.hold(x402_node.x402.check(header), PRICE)
    fetch = _http(x402_node, _refunds(x402_node))
    with pytest.raises(RuntimeError, match="402"):
        payer.scheme.refund(URL, RefundOptions(fetch=fetch))
    assert x402_node.world.chain.channel(first.voucher.channel_id).refund_nonce == 0, "nothing refunded"
    x402_node.x402.payments.cancel(hold)

    def never_mirrored(channel: bytes, nonce: int) -> bool:
        return False
    stuck = X402Refunds(x402_node.x402, x402_node.world.chain.channel, x402_node.world.chain.refund, never_mirrored,
                        mirror_wait_s=0.1)
    assert payer.scheme.refund(URL, RefundOptions(fetch=_http(x402_node, stuck))).success
    with pytest.raises(X402Refused) as busy:  # the mirror has not shown the refund: the channel stays held
        x402_node.x402.hold(x402_node.x402.check(header), PRICE)
    assert busy.value.reason.endswith("channel_busy")


def test_a_payment_sent_again_while_a_refund_is_not_mirrored_replays_only_to_its_payer(
        x402_node: X402Node, roles: Roles) -> None:
    """A refund's claim publishes the payer's refund voucher (the very voucher of its last request when
    that request's fee was its whole price) before the mirror shows the refund: the channel stays held
    meanwhile, and a payment sent again gets 409 naming its receipt, its stored answer only with the payer's
    X-Receipt-Read (before the refund it was replayed free)."""
    payer = Payer(roles.payer, x402_node.world.rpc_url, x402_node.world.dep.chain_id)
    x402_node.serve(payer, Usage(20, 10))
    header, payment = payer.pay(x402_node.world.required())
    request = keccak(b"the request as sent")
    _, body, response = _serve(x402_node.x402, header, Usage(20, 10), request)
    payer.answered(payment, response)
    checked = x402_node.x402.check(header)
    free = x402_node.x402.replay(checked, request)
    assert free is not None and free.body == as_sent(body), "not public yet: replayed free"
    assert x402_node.x402.replay(checked, keccak(b"another request")) is None, "no answer to another body"

    def never_mirrored(channel: bytes, nonce: int) -> bool:
        return False
    stuck = X402Refunds(x402_node.x402, x402_node.world.chain.channel, x402_node.world.chain.refund, never_mirrored,
                        mirror_wait_s=0.1)
    assert payer.scheme.refund(URL, RefundOptions(fetch=_http(x402_node, stuck))).success
    with pytest.raises(VoucherConflict) as refused:
        x402_node.x402.replay(checked, request)
    receipt_id = refused.value.facts["receipt_id"]
    domain = x402_node.x402.payments.domain
    with pytest.raises(NotThePayer):
        x402_node.x402.replay(checked, request, sign_read(roles.contributor, _address(roles.contributor), receipt_id,
                                                          domain))
    own = x402_node.x402.replay(checked, request, sign_read(roles.payer, _address(roles.payer), receipt_id, domain))
    assert own is not None and own.body == as_sent(body)


def _address(key: str) -> str:
    return str(Account.from_key(key).address)


def test_the_sdk_refunds_through_the_nodes_route(x402_node: X402Node, roles: Roles) -> None:
    """`GET /x402/refund` as the SDK calls it: the probe's 402 names the channel terms, the refund answers
    200 with PAYMENT-RESPONSE."""
    app = FastAPI()
    app.state.services = SimpleNamespace(x402_refunds=_refunds(x402_node))
    install_error_handlers(app)
    app.include_router(x402_refund.router)
    http = TestClient(app)

    def fetch(url: str, headers: dict[str, str]) -> _RefundResponse:
        resp = http.get("/x402/refund", headers=headers)
        return _RefundResponse(resp.status_code, dict(resp.headers))
    payer = Payer(roles.payer, x402_node.world.rpc_url, x402_node.world.dep.chain_id)
    first, charged = x402_node.serve(payer, Usage(20, 10))
    probe = http.get("/x402/refund")
    assert probe.status_code == 402 and "PAYMENT-REQUIRED" in probe.headers
    out = payer.scheme.refund("http://testserver/x402/refund", RefundOptions(fetch=fetch))
    assert out.success and int(out.amount) == first.deposit.amount - charged
    assert x402_node.world.chain.channel(first.voucher.channel_id).balance == charged


def test_a_refund_payload_settles_through_the_facilitator(x402_node: X402Node, roles: Roles) -> None:
    """`POST /x402/settle` with the SDK's `refund` payload (what a facilitator client sends): the same
    cooperative refund, the charge claimed and the rest returned; a refund voucher below the charge is
    refused with the corrective reason and nothing moves."""
    facilitator = Facilitator(x402_node.world.terms, x402_node.world.chain,
                              erc20_balance_of(x402_node.world.chain.client))
    facilitator.refund = _refunds(x402_node, _relayed(x402_node, roles)).refund
    answers: list[dict[str, object]] = []

    def fetch(url: str, headers: dict[str, str]) -> _RefundResponse:
        header = headers.get(PAYMENT_SIGNATURE_HEADER)
        if header is None:
            return _required(x402_node, None)
        payload = decode_header(header)
        answers.append(facilitator.settle({"x402Version": 2, "paymentPayload": payload,
                                           "paymentRequirements": payload["accepted"]}))
        if answers[-1]["success"]:
            return _RefundResponse(200, {"PAYMENT-RESPONSE": encode_header(answers[-1])})
        return _RefundResponse(402, {"PAYMENT-REQUIRED": encode_header(payment_required(
            URL, [x402_node.world.terms.requirements(PRICE)], str(answers[-1]["errorReason"])))})
    payer = Payer(roles.payer, x402_node.world.rpc_url, x402_node.world.dep.chain_id)
    first, charged = x402_node.serve(payer, Usage(20, 10))
    key = "0x" + first.voucher.channel_id.hex()
    state = payer.scheme._storage.get(key)
    state.charged_cumulative_amount = "1"  # a refund voucher below the charge
    payer.scheme._storage.set(key, state)
    with pytest.raises(RuntimeError):
        payer.scheme.refund(URL, RefundOptions(fetch=fetch))
    assert answers[-1]["errorReason"] == CUMULATIVE_MISMATCH
    assert x402_node.world.chain.channel(first.voucher.channel_id).refund_nonce == 0, "nothing moved"

    state.charged_cumulative_amount = str(charged)
    payer.scheme._storage.set(key, state)
    before = x402_node.balance_of(first.config.payer)
    out = payer.scheme.refund(URL, RefundOptions(fetch=fetch))
    assert out.success and int(out.amount) == first.deposit.amount - charged
    assert x402_node.balance_of(first.config.payer) - before == first.deposit.amount - charged, "to the wei"
    on_chain = x402_node.world.chain.channel(first.voucher.channel_id)
    assert on_chain.balance == on_chain.total_claimed == charged


def test_refunds_of_a_wei_each_cannot_make_the_node_pay_a_transaction_each(x402_node: X402Node,
                                                                          roles: Roles) -> None:
    payer = Payer(roles.payer, x402_node.world.rpc_url, x402_node.world.dep.chain_id)
    first, charged = x402_node.serve(payer, Usage(20, 10))
    x402_node.x402.terms = replace(x402_node.x402.terms, min_deposit=1_000)  # what a deposit's gas is worth
    refunds, w3 = _refunds(x402_node), x402_node.world.deployer.w3
    fetch, node = _http(x402_node, refunds), Roles.address(roles.node)
    refused, answer = [], refunds.refund

    def refund(header: str) -> dict[str, object]:
        try:
            return answer(header)
        except X402Refused as exc:
            refused.append(exc.reason)
            raise
    refunds.refund = refund  # type: ignore[method-assign]
    sent, paid = w3.eth.get_transaction_count(node), []
    for _ in range(3):
        with contextlib.suppress(RuntimeError):  # the SDK gives up on the node's refusal
            paid.append(w3.eth.get_transaction_receipt(
                payer.scheme.refund(URL, RefundOptions(amount="1", fetch=fetch)).transaction)["gasUsed"])
    assert not paid, f"the node paid {paid} gas to return 1 wei each time"
    assert w3.eth.get_transaction_count(node) == sent
    assert set(refused) == {BELOW_MIN_DEPOSIT}
    rest = payer.scheme.refund(URL, RefundOptions(fetch=fetch))  # everything: always
    assert rest.success and int(rest.amount) == first.deposit.amount - charged


def test_a_refund_sent_again_or_asked_in_units_by_a_stranger_costs_the_node_no_more_transactions(
        x402_node: X402Node, roles: Roles) -> None:
    """The refund voucher is (channel, charged total) and the `amount` is unsigned: whoever holds the payer's
    refund header (or the voucher, once a claim published it) could ask for it again, or for 1 unit at a
    time, each a transaction from the node's gas key. At a voucher total an earlier refund used, only the
    whole balance is refunded; the payer still gets all of it back, in one more transaction."""
    payer = Payer(roles.payer, x402_node.world.rpc_url, x402_node.world.dep.chain_id)
    first, charged = x402_node.serve(payer, Usage(20, 10))
    channel, deposit, who = first.voucher.channel_id, first.deposit.amount, first.config.payer
    refunds = _refunds(x402_node, _relayed(x402_node, roles))
    sent: list[str] = []

    def fetch(url: str, headers: dict[str, str]) -> _RefundResponse:
        if PAYMENT_SIGNATURE_HEADER in headers:
            sent.append(headers[PAYMENT_SIGNATURE_HEADER])
        return _http(x402_node, refunds)(url, headers)
    gas_key = Roles.address(roles.relayer)
    w3, start = x402_node.world.deployer.w3, x402_node.balance_of(who)
    txs_before = w3.eth.get_transaction_count(gas_key)
    assert payer.scheme.refund(URL, RefundOptions(amount="1000", fetch=fetch)).success
    header = sent[-1]
    as_stranger = decode_header(header)
    as_stranger["payload"]["amount"] = "1"
    outcomes = []
    for ask in [header] * 3 + [encode_header(as_stranger)] * 3:
        try:
            outcomes.append(f"refunded {refunds.refund(ask)['amount']}")
        except X402Refused as refused:
            outcomes.append(refused.reason)
    assert outcomes == [ERR_REFUND_AMOUNT_INVALID] * 6, "a used refund voucher refunds only the whole balance"
    assert w3.eth.get_transaction_count(gas_key) - txs_before == 1, "one transaction: the payer's refund"
    assert x402_node.world.chain.channel(channel).balance == deposit - 1_000

    rest = payer.scheme.refund(URL, RefundOptions(fetch=fetch))
    assert rest.success and int(rest.amount) == deposit - 1_000 - charged
    assert x402_node.balance_of(who) - start == deposit - charged, "the payer got everything else, to the wei"
    with pytest.raises(X402Refused) as drained:
        refunds.refund(header)
    assert drained.value.reason.endswith("refund_no_balance")
    assert w3.eth.get_transaction_count(gas_key) - txs_before == 2, "the payer's two refunds, nothing else"


def test_a_second_partial_refund_at_one_charged_total_waits_for_a_charge_and_the_rest_never_waits(
        x402_node: X402Node, roles: Roles) -> None:
    payer = Payer(roles.payer, x402_node.world.rpc_url, x402_node.world.dep.chain_id)
    first, _ = x402_node.serve(payer, Usage(20, 10))
    who, deposit = first.config.payer, first.deposit.amount
    fetch, start = _http(x402_node, _refunds(x402_node)), x402_node.balance_of(who)
    assert payer.scheme.refund(URL, RefundOptions(amount="1000", fetch=fetch)).success
    with pytest.raises(RuntimeError, match=ERR_REFUND_AMOUNT_INVALID):
        payer.scheme.refund(URL, RefundOptions(amount="1000", fetch=fetch))
    _, charged = x402_node.serve(payer, Usage(10, 5))  # a new charge: a new refund voucher
    assert payer.scheme.refund(URL, RefundOptions(amount="1000", fetch=fetch)).success
    rest = payer.scheme.refund(URL, RefundOptions(fetch=fetch))
    assert rest.success and int(rest.amount) == deposit - 2_000 - charged
    assert x402_node.balance_of(who) - start == deposit - charged, "the payer got everything else, to the wei"


def test_a_refund_whose_transaction_reverts_leaves_its_voucher_unused(x402_node: X402Node, roles: Roles) -> None:
    payer = Payer(roles.payer, x402_node.world.rpc_url, x402_node.world.dep.chain_id)
    first, charged = x402_node.serve(payer, Usage(20, 10))
    who, deposit = first.config.payer, first.deposit.amount
    not_the_authorizer = X402Chain(ContractClient(x402_node.world.rpc_url, roles.relayer), x402_node.world.terms.router,
                                   authorizer_key=roles.contributor)  # its signatures: the contract reverts
    start = x402_node.balance_of(who)
    with pytest.raises(ChainError, match="InvalidAuthorizerSignature"):
        payer.scheme.refund(URL, RefundOptions(fetch=_http(x402_node, _refunds(x402_node, not_the_authorizer))))
    assert x402_node.world.chain.channel(first.voucher.channel_id).refund_nonce == 0, "nothing refunded"
    out = payer.scheme.refund(URL, RefundOptions(fetch=_http(x402_node, _refunds(x402_node))))
    assert out.success and x402_node.balance_of(who) - start == deposit - charged


def test_a_refund_waits_for_a_request_placing_its_hold_on_the_channel_and_then_finds_it_held(
        x402_node: X402Node, roles: Roles) -> None:
    """A request's hold takes its channel's lane lock; a refund placed its hold under the router's lock, so
    on PostgreSQL both read the lane free at once and both went ahead: the refund returned the balance the
    request was being served on."""
    payer = Payer(roles.payer, x402_node.world.rpc_url, x402_node.world.dep.chain_id)
    first, _ = x402_node.serve(payer, Usage(20, 10))
    x402, refunds, outcomes = x402_node.x402, _refunds(x402_node), []

    def fetch(url: str, headers: dict[str, str]) -> _RefundResponse:
        if PAYMENT_SIGNATURE_HEADER in headers:
            try:
                settled = refunds.refund(headers[PAYMENT_SIGNATURE_HEADER])
            except X402Refused as refused:
                outcomes.append(refused.reason)
                return _required(x402_node, refused)
            outcomes.append(f"refunded {settled['amount']}")
            return _RefundResponse(200, {"PAYMENT-RESPONSE": encode_header(settled)})
        return _required(x402_node, None)

    def refund() -> None:
        with contextlib.suppress(RuntimeError):
            payer.scheme.refund(URL, RefundOptions(fetch=fetch))
    ledger, lane = x402.ledger, x402.book.lane_of(first.voucher.channel_id, first.config)
    request = threading.Thread(target=refund)
    with ledger.lanes.transaction(lock_payer=x402.router, node=ledger.node, lock_lane=lane) as tx:  # as x402.hold
        tx.lane_view(x402.router, ledger.node, lane, to_hex(keccak(b"a request")))
        request.start()
        request.join(timeout=3)  # a refund that does not wait for the lane's lock is done by now
        tx.put_hold(x402.router, ledger.node, lane, PRICE, to_hex(keccak(b"a request")),
                    datetime.fromtimestamp(ledger.clock(), UTC), ledger.instance)
    request.join()
    assert outcomes and all(o.endswith("channel_busy") for o in outcomes), outcomes
    assert x402_node.world.chain.channel(first.voucher.channel_id).refund_nonce == 0, "nothing refunded"
