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
from tests.payment.x402.conftest import X402World
from tests.payment.x402.sdk import Payer

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
