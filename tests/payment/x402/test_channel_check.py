"""The node's checks of a batch-settlement payment, against payloads the x402 SDK builds from the
node's own 402 (docs/x402.md, "Verification" and the money rules)."""

from __future__ import annotations

import base64
import json
from dataclasses import replace

import pytest
from x402.mechanisms.evm.batch_settlement.types import ChannelConfig as SdkConfig
from x402.mechanisms.evm.batch_settlement.types import ChannelStateExtra, VoucherStateExtra
from x402.mechanisms.evm.batch_settlement.utils import compute_channel_id
from x402.schemas import PaymentRequired

from node.errors import BadRequest
from node.payment.x402.channel_check import (
    ChannelView,
    X402Refused,
    check_deposit_signature,
    check_min_deposit,
    check_payment,
)
from node.payment.x402.terms import CUMULATIVE_MISMATCH
from node.payment.x402.typed import channel_id, deposit_nonce, receive_digest
from node.payment.x402.wire import decode_payment
from node.protocol.eip712 import Domain, sign_digest
from tests.payment.x402.sdk import SdkPayer, node_terms, required_for

FUNDED = ChannelView(balance=10_000)


def test_the_sdk_picks_batch_settlement_from_our_402_and_its_channel_id_is_ours() -> None:
    terms = node_terms()
    payment = decode_payment(SdkPayer().pay(required_for(terms, 300)))
    assert payment.kind == "deposit" and payment.deposit is not None
    assert payment.config.receiver == terms.router and payment.config.receiver_authorizer == terms.authorizer
    sdk_id = compute_channel_id(SdkConfig.from_dict(payment.config.to_json()), terms.network)
    assert "0x" + channel_id(payment.config, terms.chain_id).hex() == sdk_id
    assert payment.voucher.max_claimable == 300


def test_a_fresh_voucher_at_the_running_total_passes() -> None:
    terms = node_terms()
    payment = decode_payment(SdkPayer().pay(required_for(terms, 300)))
    checked = check_payment(payment, terms, ChannelView(), ceiling=280)  # the deposit covers itself
    assert checked.amount == 300 and checked.channel_id == payment.voucher.channel_id


def test_a_voucher_above_the_deposit_is_refused() -> None:
    terms = node_terms()
    payment = decode_payment(SdkPayer().pay(required_for(terms, 300)))
    voucher_only = replace(payment, kind="voucher", deposit=None)
    with pytest.raises(X402Refused) as err:
        check_payment(voucher_only, terms, ChannelView(balance=299), ceiling=300)
    assert err.value.reason.endswith("cumulative_exceeds_balance")


def test_a_pending_withdrawal_is_not_spendable() -> None:
    terms = node_terms()
    payment = replace(decode_payment(SdkPayer().pay(required_for(terms, 300))), kind="voucher", deposit=None)
    with pytest.raises(X402Refused) as err:
        check_payment(payment, terms, ChannelView(balance=1000, pending_withdrawal=800), ceiling=300)
    assert err.value.reason.endswith("cumulative_exceeds_balance")


def test_a_replayed_voucher_gets_the_corrective_402_not_a_second_generation() -> None:
    terms = node_terms()
    payment = decode_payment(SdkPayer().pay(required_for(terms, 300)))
    after_charge = ChannelView(charged=250, signed_max=300, signature=payment.voucher.signature, balance=10_000)
    with pytest.raises(X402Refused) as err:
        check_payment(payment, terms, after_charge, ceiling=300)
    assert err.value.reason == CUMULATIVE_MISMATCH
    assert err.value.channel_state is not None and err.value.channel_state["chargedCumulativeAmount"] == "250"
    assert err.value.voucher_state == {"signedMaxClaimable": "300", "signature": "0x" + payment.voucher.signature.hex()}


def test_a_channel_for_another_receiver_authorizer_or_delay_is_refused() -> None:
    terms = node_terms()
    payment = decode_payment(SdkPayer().pay(required_for(terms, 300)))
    for other, reason in ((node_terms(router="0x" + "cd" * 20), "receiver_mismatch"),
                          (node_terms(authorizer="0x" + "ef" * 20), "receiver_authorizer_mismatch"),
                          (node_terms(withdraw_delay_s=900), "withdraw_delay_mismatch"),
                          (node_terms(token="0x" + "71" * 20), "token_mismatch")):
        with pytest.raises(X402Refused) as err:
            check_payment(payment, other, FUNDED, ceiling=300)
        assert err.value.reason.endswith(reason)


def test_a_voucher_for_another_channel_or_chain_is_refused() -> None:
    terms = node_terms()
    mine = decode_payment(SdkPayer().pay(required_for(terms, 300)))
    theirs = decode_payment(SdkPayer(key="0x" + "6b" * 32).pay(required_for(terms, 300)))
    spliced = replace(mine, voucher=theirs.voucher)
    with pytest.raises(X402Refused) as err:
        check_payment(spliced, terms, FUNDED, ceiling=300)
    assert err.value.reason.endswith("channel_id_mismatch")
    other_chain = decode_payment(SdkPayer(chain_id=1).pay(required_for(node_terms(chain_id=1), 300)))
    with pytest.raises(X402Refused) as err:
        check_payment(other_chain, terms, FUNDED, ceiling=300)
    assert err.value.reason.endswith("network_mismatch")


def test_a_forged_signature_is_refused() -> None:
    terms = node_terms()
    payment = decode_payment(SdkPayer().pay(required_for(terms, 300)))
    forged = replace(payment, voucher=replace(payment.voucher, max_claimable=30_000))
    with pytest.raises(X402Refused) as err:
        check_payment(forged, terms, ChannelView(balance=100_000, charged=29_700), ceiling=300)
    assert err.value.reason.endswith("voucher_signature")


def test_an_amount_below_this_requests_ceiling_is_refused() -> None:
    terms = node_terms()
    payment = decode_payment(SdkPayer().pay(required_for(terms, 300)))
    with pytest.raises(X402Refused) as err:
        check_payment(payment, terms, FUNDED, ceiling=301)
    assert err.value.reason.endswith("amount_below_price")


def test_our_corrective_402_is_what_the_sdk_reads() -> None:
    terms = node_terms()
    first = decode_payment(SdkPayer().pay(required_for(terms, 300)))
    view = ChannelView(charged=120, signed_max=300, signature=first.voucher.signature, balance=10_000)
    with pytest.raises(X402Refused) as err:
        check_payment(first, terms, view, ceiling=300)
    corrective = PaymentRequired.model_validate(
        required_for(terms, 300, channel_state=err.value.channel_state, voucher_state=err.value.voucher_state))
    extra = corrective.accepts[1].extra
    assert ChannelStateExtra.from_dict(extra["channelState"]).charged_cumulative_amount == "120"
    assert VoucherStateExtra.from_dict(extra["voucherState"]).signed_max_claimable == "300"


@pytest.mark.parametrize("header", ["%%%", base64.b64encode(b"[1]").decode(),
                                    base64.b64encode(json.dumps({"x402Version": 1}).encode()).decode(),
                                    base64.b64encode(json.dumps({"x402Version": 2, "accepted": {"scheme": "exact"},
                                                                 "payload": {}}).encode()).decode()])
def test_malformed_headers_are_bad_requests(header: str) -> None:
    with pytest.raises(BadRequest):
        decode_payment(header)


def test_a_deposit_authorization_not_signed_by_its_payer_is_refused_before_any_gas() -> None:
    """The SDK's own deposit passes; the same deposit with its ERC-3009 signature by another key (or not
    a signature at all), or for another amount, is refused offline: the node sends no transaction."""
    terms = node_terms()
    payment = decode_payment(SdkPayer().pay(required_for(terms, 300)))
    check_deposit_signature(payment, terms)
    deposit = payment.deposit
    assert deposit is not None
    forged = sign_digest("0x" + "77" * 32, receive_digest(
        Domain(terms.chain_id, terms.token, name=terms.token_name, version=terms.token_version),
        payment.config.payer, deposit.amount, deposit.valid_after, deposit.valid_before,
        deposit_nonce(payment.voucher.channel_id, deposit.salt)))
    for bad in (replace(deposit, signature=forged), replace(deposit, signature=b"\x01" * 65),
                replace(deposit, amount=deposit.amount * 10)):
        with pytest.raises(X402Refused) as err:
            check_deposit_signature(replace(payment, deposit=bad), terms)
        assert err.value.reason == "invalid_batch_settlement_evm_receive_authorization_signature"


def test_a_deposit_below_the_announced_minimum_is_refused_before_any_gas() -> None:
    """Each deposit costs the node a transaction's gas: a node announcing `extra.minDeposit` refuses dust
    deposits (a payer topping up 1 wei at a time would have it pay gas for nothing). The SDK reads the
    announcement and deposits at least that much."""
    terms = node_terms(min_deposit=50_000)
    required = required_for(terms, 300)
    offer = next(a for a in required["accepts"] if a["scheme"] == "batch-settlement")
    assert offer["extra"]["minDeposit"] == "50000"
    payment = decode_payment(SdkPayer().pay(required))
    assert payment.deposit is not None and payment.deposit.amount >= 50_000
    check_min_deposit(payment, terms)
    dust = replace(payment, deposit=replace(payment.deposit, amount=49_999))
    with pytest.raises(X402Refused) as err:
        check_min_deposit(dust, terms)
    assert err.value.reason == "invalid_batch_settlement_evm_deposit_below_min_deposit"
    assert "minDeposit" not in node_terms().requirements(300)["extra"], "no minimum: none announced"


def test_a_payment_naming_a_field_twice_is_refused() -> None:
    header = SdkPayer().pay(required_for(node_terms(), 300))
    raw = base64.b64decode(header).decode()
    twice = raw[:-1] + ',"x402Version":2}'
    with pytest.raises(BadRequest, match="each field named once") as err:
        decode_payment(base64.b64encode(twice.encode()).decode())
    assert "named twice" in err.value.facts["reason"]
