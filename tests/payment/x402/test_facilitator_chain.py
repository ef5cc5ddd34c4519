"""The node's facilitator against the chain: `/verify` of a deposit whose ERC-3009 authorization was used
already (the deposit is in the channel) is invalid with the spec's reason, as `/settle` refuses it
(the spec's facilitator simulates the deposit: it would revert)."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from node.payment.x402.facilitator import Facilitator, erc20_balance_of
from tests.fixtures.contracts import Roles
from tests.payment.x402.conftest import X402World, at_once_between_blocks
from tests.payment.x402.sdk import Payer
from tests.payment.x402.test_service import _services

pytestmark = pytest.mark.chain
SIMULATION_FAILED = "invalid_batch_settlement_evm_deposit_simulation_failed"


def _body(header: str) -> dict[str, Any]:
    payload = json.loads(base64.b64decode(header))
    return {"x402Version": 2, "paymentPayload": payload, "paymentRequirements": payload["accepted"]}


def test_verify_refuses_a_deposit_authorization_used_already(x402_world: X402World, roles: Roles) -> None:
    facilitator = Facilitator(x402_world.terms, x402_world.chain, erc20_balance_of(x402_world.chain.client))
    header, payment = Payer(roles.payer, x402_world.rpc_url, x402_world.dep.chain_id).pay(x402_world.required())
    body = _body(header)
    assert facilitator.verify(body)["isValid"]
    settled = facilitator.settle(body)
    assert settled["success"], settled
    verified = facilitator.verify(body)
    assert not verified["isValid"] and verified["invalidReason"] == SIMULATION_FAILED, verified
    assert "used already" in verified["invalidMessage"]
    again = facilitator.settle(body)
    assert not again["success"] and again["errorReason"] == SIMULATION_FAILED
    assert x402_world.chain.channel(payment.voucher.channel_id).balance == payment.deposit.amount, "deposited once"


def test_the_same_deposit_settled_on_two_replicas_at_once_is_sent_once(db_url: str, x402_world: X402World,
                                                                       roles: Roles) -> None:
    """`POST /x402/settle` of one deposit on two replicas at once (a chain that mines every 2 s): both
    passed the simulation before the first was mined, both were sent, the second reverted (the node's gas
    for nothing). Each replica's facilitator now submits through the paid path's lock (one per channel in
    the database until mined): the second finds the authorization used and sends nothing."""
    replicas = [Facilitator(x402_world.terms, x402_world.chain, erc20_balance_of(x402_world.chain.client),
                            submit_deposit=_services(db_url, x402_world, roles)[0].submit_deposit_once)
                for _ in range(2)]
    header, payment = Payer(roles.payer, x402_world.rpc_url, x402_world.dep.chain_id).pay(x402_world.required())
    w3, node = x402_world.chain.client.w3, x402_world.chain.client.address
    sent_before = w3.eth.get_transaction_count(node)
    answers: list[dict[str, Any]] = []
    at_once_between_blocks(w3, [lambda f=f: answers.append(f.settle(_body(header))) for f in replicas])
    assert w3.eth.get_transaction_count(node) - sent_before == 1, answers
    assert sorted(a["success"] for a in answers) == [False, True], answers
    assert x402_world.chain.channel(payment.voucher.channel_id).balance == payment.deposit.amount
