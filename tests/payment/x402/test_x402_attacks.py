"""Attacks on the x402 path, each through the node's payment service on our channel contract (anvil) with
the SDK as the honest payer: a header whose amounts are not ASCII decimals, strangers who sign vouchers
for channels with nothing in them (each used to write a row of the node's books), and a payer whose
deposit is slow to be mined (it used to hold every other x402 payer's hold until it was). Strangers'
empty channels leave nothing behind, in the books or in the node's memory (its cache of chain reads
kept every channel id ever named, a process growing without bound)."""

from __future__ import annotations

import base64
import json
import threading
import time
from typing import Any

import pytest
from sqlalchemy import func, select
from web3.exceptions import Web3RPCError

from node.db.payment_models import X402Channel
from node.errors import BadRequest, ChainError
from node.payment.service import Usage
from node.payment.x402.channel_check import X402Refused
from node.payment.x402.wire import decode_payment
from tests.fixtures.contracts import Roles
from tests.payment.x402.conftest import X402World, at_once_between_blocks
from tests.payment.x402.sdk import PRICE, Payer, SdkPayer, node_terms, required_for
from tests.payment.x402.test_service import _serve, _services

pytestmark = pytest.mark.chain


def _rewrite(header: str, change: Any) -> str:
    value = json.loads(base64.b64decode(header))
    change(value)
    return base64.b64encode(json.dumps(value).encode()).decode()


@pytest.mark.parametrize("amount", ["\u00b2", "\u0663", "1\u00b9"], ids=["superscript", "arabic-indic", "mixed"])
def test_amounts_in_digits_other_than_ascii_are_a_bad_request_not_a_crash(amount: str) -> None:
    """`str.isdigit` holds for '²', which `int` refuses (a 500), and for '٣', which it reads as 3."""
    header = SdkPayer().pay(required_for(node_terms(), PRICE))
    paths = (("accepted", "amount"), ("payload", "voucher", "maxClaimableAmount"), ("payload", "deposit", "amount"))
    for path in paths:
        def change(v: dict[str, Any], path: tuple[str, ...] = path) -> None:
            inner = v
            for key in path[:-1]:
                inner = inner[key]
            inner[path[-1]] = amount
        with pytest.raises(BadRequest, match="decimal string"):
            decode_payment(_rewrite(header, change)).accepted_amount  # noqa: B018


def _voucher_only(header: str) -> str:
    """The SDK's first payment (a deposit) as a bare voucher: a valid signature on a channel left empty."""
    def change(v: dict[str, Any]) -> None:
        v["payload"]["type"] = "voucher"
        v["payload"].pop("deposit")
    return _rewrite(header, change)


def test_strangers_vouchers_on_empty_channels_leave_no_row_in_the_books(db_url: str, x402_world: X402World,
                                                                        roles: Roles) -> None:
    x402, factory = _services(db_url, x402_world, roles)
    x402.chain_reads.max_empty = 2  # what the node remembers of channels read empty is bounded
    for i in range(3):  # any number of fresh keys, each signing for a channel it never funded
        payer = Payer("0x" + f"{i + 1:02x}" * 32, x402_world.rpc_url, x402_world.dep.chain_id)
        header, _ = payer.pay(x402_world.required())
        with pytest.raises(X402Refused) as refused:
            x402.hold(x402.check(_voucher_only(header)), PRICE)
        assert refused.value.reason.endswith("cumulative_exceeds_balance")
    broke = Payer("0x" + "42" * 32, x402_world.rpc_url, x402_world.dep.chain_id)  # a deposit it cannot make
    header, _ = broke.pay(x402_world.required())
    with pytest.raises(X402Refused, match="deposit reverted"):
        x402.hold(x402.check(header), PRICE)
    with factory() as session:
        assert session.scalar(select(func.count()).select_from(X402Channel)) == 0
    assert len(x402.chain_reads) <= 2, "each stranger's empty channel stayed in the node's memory for good"


def test_a_deposit_waiting_to_be_mined_does_not_hold_up_other_payers(db_url: str, x402_world: X402World,
                                                                     roles: Roles) -> None:
    x402, _ = _services(db_url, x402_world, roles)
    funded = Payer(roles.payer, x402_world.rpc_url, x402_world.dep.chain_id)
    header, _ = funded.pay(x402_world.required())
    x402.payments.cancel(x402.hold(x402.check(header), PRICE))  # its deposit is in; nothing charged
    x402_world.deployer.transact(x402_world.deployer.contract("DemoToken3009", x402_world.terms.token)
                                 .functions.mint(x402_world.deployer.address, 10**18))
    slow = Payer(roles.deployer, x402_world.rpc_url, x402_world.dep.chain_id)
    slow_header, _ = slow.pay(x402_world.required())
    anvil = x402_world.chain.client.w3.provider
    anvil.make_request("evm_setAutomine", [False])
    anvil.make_request("evm_setIntervalMining", [4])
    try:
        waiting = threading.Thread(target=lambda: x402.hold(x402.check(slow_header), PRICE))
        waiting.start()
        time.sleep(0.5)  # the slow payer's deposit is sent and waits for its block
        started = time.monotonic()
        hold = x402.hold(x402.check(_voucher_only(header)), PRICE)  # the funded payer's voucher: no chain write
        took = time.monotonic() - started
        x402.payments.cancel(hold)
        waiting.join(timeout=30)
    finally:
        anvil.make_request("evm_setIntervalMining", [0])
        anvil.make_request("evm_setAutomine", [True])
    assert took < 2.0, f"a funded payer's hold waited {took:.1f} s for another payer's deposit to be mined"


def _spend_as_someone_else(corrective: X402Refused, stale: str, charged: int) -> str:
    """An attacker's header: the channel's latest voucher as the corrective 402 shows it, with the amount
    that makes it match the channel's charged total (the amount is the client's to say)."""
    state = corrective.voucher_state
    assert state is not None
    latest = int(state["signedMaxClaimable"])

    def change(v: dict[str, Any]) -> None:
        v["payload"]["type"] = "voucher"
        v["payload"].pop("deposit", None)
        v["payload"]["voucher"]["maxClaimableAmount"] = str(latest)
        v["payload"]["voucher"]["signature"] = state["signature"]
        v["accepted"]["amount"] = str(latest - charged)
    return _rewrite(stale, change)


def test_a_voucher_whose_hold_was_released_is_not_handed_to_whoever_asks(db_url: str, x402_world: X402World,
                                                                         roles: Roles) -> None:
    """The victim's second voucher is held, then released (a node fault before any token: nothing
    charged, the voucher still good for its retry). Anyone holding an old voucher of the channel (they are
    public once claimed on chain) gets a corrective 402; it must not carry that unspent voucher, which
    would pay the stranger's next request from the victim's channel. Once spent, it may be shown."""
    x402, _ = _services(db_url, x402_world, roles)
    victim = Payer(roles.payer, x402_world.rpc_url, x402_world.dep.chain_id)
    stale, first = victim.pay(x402_world.required())
    total, _, response = _serve(x402, stale, Usage(20, 10))
    victim.answered(first, response)
    pending, _ = victim.pay(x402_world.required())
    x402.payments.cancel(x402.hold(x402.check(pending), PRICE))  # a node fault before any token

    with pytest.raises(X402Refused) as corrective:
        x402.hold(x402.check(stale), PRICE)
    state = corrective.value.voucher_state
    if state is not None and state.get("signature"):
        stolen = _spend_as_someone_else(corrective.value, stale, total)
        hold = x402.hold(x402.check(stolen), PRICE)  # the stranger's request, on the victim's channel
        x402.payments.cancel(hold)
        pytest.fail("a stranger held the victim's unspent voucher for its own request")

    _serve(x402, pending, Usage(1, 1))  # the victim's retry spends it
    with pytest.raises(X402Refused) as after:
        x402.hold(x402.check(stale), PRICE)
    assert after.value.voucher_state is not None and after.value.voucher_state["signature"]


def test_what_a_channel_could_still_pay_excludes_what_the_node_charged_before_claiming(
        db_url: str, x402_world: X402World, roles: Roles) -> None:
    """What lets a channel make the node load cold adapters: a channel charged to its deposit's end and not
    yet claimed can pay nothing more."""
    x402, _ = _services(db_url, x402_world, roles)
    payer = Payer(roles.payer, x402_world.rpc_url, x402_world.dep.chain_id)
    header, first = payer.pay(x402_world.required())
    checked = x402.check(header)
    assert first.deposit is not None
    total, _, _ = _serve(x402, header, Usage(20, 10))
    x402.chain_reads.deposited(checked.channel_id)  # read afresh
    assert x402.unclaimed(checked) == first.deposit.amount - total


def test_the_same_deposit_sent_many_times_at_once_costs_the_node_one_transaction(
        db_url: str, x402_world: X402World, roles: Roles) -> None:
    """Every copy passes the checks before the first is mined. Sent at once from the node's key, they took
    the same nonce: all but one failed with a 500 (a different payer's deposit too). Deposits go one at a
    time (a voucher never waits for them: the test above)."""
    x402, _ = _services(db_url, x402_world, roles)
    header, _ = Payer(roles.payer, x402_world.rpc_url, x402_world.dep.chain_id).pay(x402_world.required())
    w3 = x402_world.chain.client.w3
    node = x402_world.chain.client.address
    sent_before = w3.eth.get_transaction_count(node)
    outcomes: list[str] = []
    at_once_between_blocks(w3, [lambda: _hold_and_cancel(x402, header, outcomes) for _ in range(4)])
    assert w3.eth.get_transaction_count(node) - sent_before == 1, outcomes
    assert "held" in outcomes and all(o == "held" or o.startswith("X402Refused") for o in outcomes), outcomes


def test_the_same_deposit_sent_to_two_replicas_at_once_costs_the_node_one_transaction(
        db_url: str, x402_world: X402World, roles: Roles) -> None:
    """Replicas share the database, not the process lock that sends one deposit at a time: the same
    PAYMENT-SIGNATURE sent to two of them at once was submitted by both before the first was mined, and the
    second reverted (its authorization used), a transaction the node paid for nothing, as many as there are
    replicas, for each deposit an attacker signs. The deposit's submission is now locked per channel in the
    database until it is mined, so the second replica finds it used and submits nothing."""
    replicas = [_services(db_url, x402_world, roles)[0] for _ in range(2)]
    header, _ = Payer(roles.payer, x402_world.rpc_url, x402_world.dep.chain_id).pay(x402_world.required())
    w3 = x402_world.chain.client.w3
    node = x402_world.chain.client.address
    sent_before = w3.eth.get_transaction_count(node)
    outcomes: list[str] = []
    at_once_between_blocks(w3, [lambda x402=x402: _hold_and_cancel(x402, header, outcomes) for x402 in replicas])
    assert w3.eth.get_transaction_count(node) - sent_before == 1, outcomes
    assert "held" in outcomes and all(o == "held" or o.startswith("X402Refused") for o in outcomes), outcomes


@pytest.mark.parametrize(("field", "value"), [("amount", str(2**128)), ("validBefore", "9" * 78)],
                         ids=["deposit above uint128", "validBefore above uint256"])
def test_a_deposit_whose_numbers_the_contract_cannot_take_is_a_bad_request(
        db_url: str, x402_world: X402World, roles: Roles, field: str, value: str) -> None:
    """Counted as balance before it is sent, a deposit of 2^128 passed every check and crashed the
    transaction's encoding (a 500)."""
    x402, _ = _services(db_url, x402_world, roles)
    header, _ = Payer(roles.payer, x402_world.rpc_url, x402_world.dep.chain_id).pay(x402_world.required())

    def change(v: dict[str, Any]) -> None:
        deposit = v["payload"]["deposit"]
        (deposit if field == "amount" else deposit["authorization"]["erc3009Authorization"])[field] = value
    with pytest.raises(BadRequest, match=field):
        x402.hold(x402.check(_rewrite(header, change)), PRICE)


def test_a_deposit_the_chain_refuses_is_the_payers_402_not_a_node_fault(db_url: str, x402_world: X402World,
                                                                       roles: Roles) -> None:
    """A payer without the tokens it authorized (or an expired or forged authorization): its deposit's
    simulation reverts. That is the payer's to fix (x402's deposit_simulation_failed), not a 500."""
    x402, _ = _services(db_url, x402_world, roles)
    header, _ = Payer("0x" + "43" * 32, x402_world.rpc_url, x402_world.dep.chain_id).pay(x402_world.required())
    with pytest.raises(X402Refused) as refused:
        x402.hold(x402.check(header), PRICE)
    assert refused.value.reason == "invalid_batch_settlement_evm_deposit_simulation_failed"
    assert refused.value.status == 402 and "reverted" in refused.value.message


def _hold_and_cancel(x402: Any, header: str, outcomes: list[str]) -> None:
    """Check and hold `header` (its deposit submitted when needed), then let the hold go; what it got goes
    into `outcomes` ("held", or the error)."""
    try:
        x402.payments.cancel(x402.hold(x402.check(header), PRICE))
        outcomes.append("held")
    except (X402Refused, ChainError, Web3RPCError) as exc:  # what each copy got, read by the test
        outcomes.append(f"{type(exc).__name__}: {exc}")
