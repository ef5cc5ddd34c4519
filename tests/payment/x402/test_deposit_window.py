"""A deposit authorization that expires before the node's deposit can land costs the node no gas.

The node pays the gas of every deposit it submits (node/payment/x402/service.py `_deposit`, the
facilitator's /settle). The token checks the authorization's window against the block the deposit lands
in (`block.timestamp < validBefore`); the node asked only its own clock (the facilitator) or nothing (the
paid path), then a simulation against the latest block. A payer signing `validBefore` one second past the
chain's latest block passed every check, and its deposit reverted in the next block: the node's gas for
nothing, the payer's tokens still there to sign the next one with. Now a deposit whose authorization
does not stay valid for `DEPOSIT_LEAD_S` past the chain's latest block is refused before any gas.
Real anvil, token, channel contract, router and the SDK's payer."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from eth_account import Account

from node.payment.x402.channel_check import DEPOSIT_LEAD_S, X402Refused
from node.payment.x402.facilitator import Facilitator, erc20_balance_of
from node.payment.x402.typed import deposit_nonce, receive_digest
from node.payment.x402.wire import decode_payment
from node.protocol.eip712 import Domain, sign_digest
from tests.fixtures.contracts import Roles
from tests.payment.x402.conftest import X402World
from tests.payment.x402.sdk import PRICE, Payer
from tests.payment.x402.test_facilitator_chain import _body
from tests.payment.x402.test_service import _services

pytestmark = pytest.mark.chain
VALID_BEFORE = "invalid_batch_settlement_evm_payload_authorization_valid_before"


def _expiring(world: X402World, roles: Roles, seconds_left: int) -> str:
    """The SDK's deposit header, its authorization re-signed by the payer to expire `seconds_left` after
    the chain's latest block."""
    header, payment = Payer(roles.payer, world.rpc_url, world.dep.chain_id).pay(world.required())
    deposit = payment.deposit
    assert deposit is not None
    valid_before = int(world.chain.client.w3.eth.get_block("latest")["timestamp"]) + seconds_left
    terms = world.terms
    domain = Domain(terms.chain_id, terms.token, name=terms.token_name, version=terms.token_version)
    signature = sign_digest(roles.payer, receive_digest(domain, payment.config.payer, deposit.amount,
                                                        deposit.valid_after, valid_before,
                                                        deposit_nonce(payment.voucher.channel_id, deposit.salt)))
    value: dict[str, Any] = json.loads(base64.b64decode(header))
    auth = value["payload"]["deposit"]["authorization"]["erc3009Authorization"]
    auth["validBefore"], auth["signature"] = str(valid_before), "0x" + signature.hex()
    out = base64.b64encode(json.dumps(value).encode()).decode()
    assert decode_payment(out).deposit.valid_before == valid_before  # type: ignore[union-attr]
    return out


def test_a_deposit_expiring_before_it_can_land_is_refused_before_any_gas(db_url: str, x402_world: X402World,
                                                                         roles: Roles) -> None:
    x402, _ = _services(db_url, x402_world, roles)
    w3 = x402_world.chain.client.w3
    node = Account.from_key(roles.node).address
    w3.provider.make_request("anvil_setBlockTimestampInterval", [12])  # type: ignore[arg-type]  # blocks as on L1
    before, nonce = w3.eth.get_balance(node), w3.eth.get_transaction_count(node)
    try:
        with pytest.raises(X402Refused) as refused:
            x402.hold(x402.check(_expiring(x402_world, roles, 1)), PRICE)
    finally:
        w3.provider.make_request("anvil_removeBlockTimestampInterval", [])  # type: ignore[arg-type]
    assert (w3.eth.get_balance(node), w3.eth.get_transaction_count(node)) == (before, nonce), (
        f"the node sent a deposit that reverted ({refused.value.reason}): {before - w3.eth.get_balance(node)} wei")
    assert refused.value.reason == VALID_BEFORE


def test_the_facilitator_judges_a_deposit_authorization_by_the_chains_time(x402_world: X402World,
                                                                           roles: Roles) -> None:
    """`/settle` of the same deposit sent it (the process clock said it was valid): the node's gas for a
    revert. One that stays valid long enough past the chain's time is settled."""
    facilitator = Facilitator(x402_world.terms, x402_world.chain, erc20_balance_of(x402_world.chain.client))
    w3 = x402_world.chain.client.w3
    node = x402_world.chain.client.address
    w3.provider.make_request("anvil_setBlockTimestampInterval", [12])  # type: ignore[arg-type]
    try:
        before, nonce = w3.eth.get_balance(node), w3.eth.get_transaction_count(node)
        settled = facilitator.settle(_body(_expiring(x402_world, roles, 1)))
        assert (w3.eth.get_balance(node), w3.eth.get_transaction_count(node)) == (before, nonce), settled
        assert not settled["success"] and settled["errorReason"] == VALID_BEFORE, settled
        lasting = facilitator.settle(_body(_expiring(x402_world, roles, DEPOSIT_LEAD_S + 30)))
        assert lasting["success"], lasting
    finally:
        w3.provider.make_request("anvil_removeBlockTimestampInterval", [])  # type: ignore[arg-type]
