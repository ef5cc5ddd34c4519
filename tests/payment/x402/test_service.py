"""x402 payments through the node's payment service and database (SQLite, and PostgreSQL in CI), the
SDK as the payer and our channel contract on anvil: each accepted x402 voucher becomes a hold on the
channel's lane of the router, is charged like a lane (the same receipts), answers with PAYMENT-RESPONSE,
and the stored router lane voucher is what Settlement collects once the router swept the channel."""

from __future__ import annotations

import base64
import json
import threading
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from node.chain.x402_channels import ClaimRow
from node.db.models import Voucher as VoucherRow
from node.db.session import make_engine, session_factory, upgrade
from node.errors import BadRequest
from node.payment.ledger import Ledger
from node.payment.pricing import Pricing
from node.payment.service import PaymentService, Usage
from node.payment.x402.book import ChannelBook
from node.payment.x402.channel_check import X402Refused
from node.payment.x402.replay import kept
from node.payment.x402.service import X402Payments
from node.payment.x402.terms import CUMULATIVE_MISMATCH
from node.protocol.eip712 import Domain
from node.protocol.receipt import Receipt as ReceiptFields
from node.protocol.receipt import SignedReceipt, adapter_id_bytes
from node.protocol.voucher import SignedVoucher
from tests.fixtures.contracts import Roles
from tests.payment.x402.conftest import X402World
from tests.payment.x402.sdk import PRICE, Payer

pytestmark = pytest.mark.chain
PRICING = Pricing(prompt_token_price=10, completion_token_price=100, min_fee=0)


def _services(db_url: str, world: X402World, roles: Roles) -> tuple[X402Payments, sessionmaker[Session]]:
    upgrade(db_url)
    factory = session_factory(make_engine(db_url))
    node = world.terms.authorizer
    payments = PaymentService(Ledger(factory, node), Domain(world.dep.chain_id, world.dep.settlement), node, PRICING)
    x402 = X402Payments(payments, ChannelBook(factory, node), world.terms, roles.node, world.chain.channel,
                        world.chain.deposit, chain_now=world.chain.now)
    return x402, factory


def _serve(x402: X402Payments, header: str, usage: Usage, request: bytes | None = None
           ) -> tuple[int, dict[str, Any], dict[str, Any]]:
    """One paid request: check, hold, charge `usage` with a receipt; (charged total, body, PAYMENT-RESPONSE).
    With `request` (its body's hash), the answer is stored as the API stores it: replayable to that request."""
    hold = x402.hold(x402.check(header), PRICE, request=request or b"")
    n = [0]

    def issue(fee: int) -> SignedReceipt:
        n[0] += 1
        fields = ReceiptFields(hold.checked.digest, adapter_id_bytes(1), 1, b"\xab" * 32, usage.prompt_tokens,
                               usage.completion_tokens, fee, b"\xcd" * 32, 1)
        return SignedReceipt(fields, hold.checked.digest, b"\x11" * 65, x402.payments.node)

    def stored(receipt: dict[str, Any]) -> dict[str, Any]:
        return {"receipt": receipt} if request is None else kept({"receipt": receipt}, request)

    total, body = x402.payments.finish(hold, usage, issue, stored)
    return total, body, x402.payment_response(hold, total)


def test_sdk_pays_through_the_service_and_the_stored_lane_is_collectible(db_url: str, x402_world: X402World,
                                                                         roles: Roles) -> None:
    x402, factory = _services(db_url, x402_world, roles)
    payer = Payer(roles.payer, x402_world.rpc_url, x402_world.dep.chain_id)
    header, first = payer.pay(x402_world.required())
    total, body, response = _serve(x402, header, Usage(20, 10))  # 200 + 1000
    assert total == 1_200 and body["receipt"]["chargedTotal"] == "1200"
    assert response["extra"]["chargedAmount"] == "1200"
    assert response["extra"]["channelState"]["chargedCumulativeAmount"] == "1200"
    assert x402_world.chain.channel(first.voucher.channel_id).balance == first.deposit.amount
    payer.answered(first, response)

    header, second = payer.pay(x402_world.required())
    assert second.kind == "voucher" and second.voucher.max_claimable == 1_200 + PRICE
    total, _, response = _serve(x402, header, Usage(10, 5))  # 100 + 500
    assert total == 1_800
    payer.answered(second, response)

    with pytest.raises(X402Refused) as replay:
        _serve(x402, header, Usage(1, 1))
    assert replay.value.reason == CUMULATIVE_MISMATCH, "a voucher buys one generation"
    assert replay.value.channel_state is not None and replay.value.channel_state["chargedCumulativeAmount"] == "1800"

    entry = x402.book.entry(second.voucher.channel_id, second.config)  # written in the hold's transaction
    assert (entry.signed_max, entry.signature) == (second.voucher.max_claimable, second.voucher.signature)
    with factory() as session:
        stored = session.get(VoucherRow, _last_hash(body))
        lane = SignedVoucher.from_row(stored) if stored is not None else None
    assert lane is not None and lane.payer.lower() == x402_world.terms.router.lower()
    x402_world.chain.collect([ClaimRow(second.config, second.voucher.max_claimable, second.voucher.signature, 1_800)])
    settlement = x402_world.chain.client.contract("Settlement", x402_world.dep.settlement)
    x402_world.chain.client.transact(settlement.functions.settle(
        1, [lane.as_abi()], [1_200], b"\x01" * 32, 1_200, bytes(32), 1))
    assert x402_world.chain.client.call(settlement.functions.rewardsTotal(x402_world.terms.authorizer)) == 1_200


def _last_hash(body: dict[str, Any]) -> str:
    return body["receipt"]["voucherHash"]


def test_one_request_at_a_time_per_channel(db_url: str, x402_world: X402World, roles: Roles) -> None:
    x402, _ = _services(db_url, x402_world, roles)
    payer = Payer(roles.payer, x402_world.rpc_url, x402_world.dep.chain_id)
    header, _ = payer.pay(x402_world.required())
    hold = x402.hold(x402.check(header), PRICE)
    with pytest.raises(X402Refused) as busy:
        x402.hold(x402.check(header), PRICE)
    assert busy.value.reason.endswith("channel_busy")
    x402.payments.cancel(hold)
    again = x402.hold(x402.check(header), PRICE)  # a node fault charged nothing: the same voucher works
    x402.payments.cancel(again)


def test_a_deposit_the_chain_refuses_places_no_hold(db_url: str, x402_world: X402World, roles: Roles) -> None:
    x402, _ = _services(db_url, x402_world, roles)
    broke = "0x" + "42" * 32  # a payer with no tokens: its authorization cannot move any
    header, _ = Payer(broke, x402_world.rpc_url, x402_world.dep.chain_id).pay(x402_world.required())
    with pytest.raises(X402Refused, match="deposit reverted"):
        x402.hold(x402.check(header), PRICE)


def test_a_voucher_for_a_smaller_ceiling_is_refused(db_url: str, x402_world: X402World, roles: Roles) -> None:
    x402, _ = _services(db_url, x402_world, roles)
    header, _ = Payer(roles.payer, x402_world.rpc_url, x402_world.dep.chain_id).pay(x402_world.required(amount=100))
    with pytest.raises(X402Refused) as refused:
        x402.hold(x402.check(header), PRICE)
    assert refused.value.reason.endswith("amount_below_price")



def test_a_refund_request_is_refused_plainly_not_looped(db_url: str, x402_world: X402World, roles: Roles) -> None:
    x402, _ = _services(db_url, x402_world, roles)
    header, _ = Payer(roles.payer, x402_world.rpc_url, x402_world.dep.chain_id).pay(x402_world.required())
    payload = json.loads(base64.b64decode(header))
    payload["payload"]["type"] = "refund"
    with pytest.raises(BadRequest, match="GET /x402/refund"):
        x402.check(base64.b64encode(json.dumps(payload).encode()).decode())


def test_each_channel_holds_under_its_own_lock(postgres_url: str, x402_world: X402World, roles: Roles) -> None:
    """PostgreSQL, several API processes: a hold locks its channel's lane, not the router (every
    channel is a lane of it), so a request on one channel never waits for another channel's hold; two
    on the same channel still take turns."""
    x402, _ = _services(postgres_url, x402_world, roles)
    token = x402_world.deployer.contract("DemoToken3009", x402_world.terms.token)
    x402_world.deployer.transact(token.functions.mint(roles.address(roles.relayer), 10**18))
    header_a, a = Payer(roles.payer, x402_world.rpc_url, x402_world.dep.chain_id).pay(x402_world.required())
    header_b, _ = Payer(roles.relayer, x402_world.rpc_url, x402_world.dep.chain_id).pay(x402_world.required())
    lane_a = x402.book.lane_of(a.voucher.channel_id, a.config)
    holds: dict[str, Any] = {}

    def hold(name: str, header: str) -> threading.Thread:
        thread = threading.Thread(target=lambda: holds.__setitem__(name, x402.hold(x402.check(header), PRICE)))
        thread.start()
        return thread

    with x402.ledger.lanes.transaction(lock_payer=x402.router, node=x402.ledger.node, lock_lane=lane_a):
        other = hold("b", header_b)
        other.join(timeout=30)
        assert "b" in holds, "another channel's hold did not wait"
        same = hold("a", header_a)
        same.join(timeout=1.0)
        assert same.is_alive() and "a" not in holds, "the same channel's hold waits for the lock"
    same.join(timeout=30)
    assert "a" in holds
    for placed in holds.values():
        x402.payments.cancel(placed)
