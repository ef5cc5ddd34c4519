"""The node as an x402 facilitator (docs/x402.md): `<node>/x402` under the stock SDK's facilitator client
verifies and settles deposits and vouchers against the chain, refuses what it will not facilitate with the
spec's codes, and answers every malformed body with a plain 400."""

from __future__ import annotations

import json
from typing import Any

import pytest
import requests
from x402.http import FacilitatorConfig, HTTPFacilitatorClientSync
from x402.schemas import PaymentPayload, PaymentRequirements

from node.client.payer import Payer as LanePayer
from node.payment.x402.typed import CHANNELS_ADDRESS, voucher_digest
from node.protocol.eip712 import sign_digest
from tests.fixtures.paid_node import PaidNode
from tests.fixtures.x402_node import chat, decode, payer_key, payment_required
from tests.payment.x402.sdk import Payer

pytestmark = [pytest.mark.chain, pytest.mark.slow]
FORGED = "invalid_batch_settlement_evm_receive_authorization_signature"


def _facilitator_request(node: PaidNode, payer: Payer, body: dict[str, Any]
                         ) -> tuple[PaymentPayload, PaymentRequirements, Any]:
    required = payment_required(node, body)
    header, payment = payer.pay(required)
    payload = PaymentPayload.model_validate(decode(header))
    requirements = PaymentRequirements.model_validate(payload.accepted.model_dump(by_alias=True))
    return payload, requirements, payment


def test_the_node_is_its_own_facilitator_under_the_sdks_facilitator_client(x402_node: PaidNode) -> None:
    """`<node>/x402` as the facilitator URL of the SDK's HTTPFacilitatorClientSync: /supported names the
    node as receiver authorizer, /verify checks a deposit and a voucher against the chain, /settle puts
    the deposit on chain once (a second settle of it is refused), and what the node will not facilitate
    (another receiver, a voucher above the deposit, a claim) is refused with the spec's codes."""
    local = x402_node.local
    facilitator = HTTPFacilitatorClientSync(FacilitatorConfig(url=f"{x402_node.base_url}/x402"))
    supported = facilitator.get_supported()
    kind = supported.kinds[0]
    assert (kind.scheme, kind.network, kind.x402_version) == ("batch-settlement", f"eip155:{local.deployment.chain_id}",
                                                              2)
    node = LanePayer(x402_node.payer_keys[0], x402_node.base_url).info.node
    assert kind.extra == {"receiverAuthorizer": node} and supported.signers == {"eip155:*": [node]}

    payer = Payer(payer_key(local, 6), local.anvil.rpc_url, local.deployment.chain_id)
    payload, requirements, payment = _facilitator_request(x402_node, payer, chat(x402_node, "the sea"))
    verified = facilitator.verify(payload, requirements)
    assert verified.is_valid and verified.payer == payment.config.payer, verified
    assert verified.extra and verified.extra["balance"] == "0", "nothing deposited yet"

    forged = _forged_deposit(payload)  # someone else's signature on the payer's deposit: no transaction
    assert facilitator.verify(forged, requirements).invalid_reason == FORGED
    refused = facilitator.settle(forged, requirements)
    assert not refused.success and refused.error_reason == FORGED

    settled = facilitator.settle(payload, requirements)
    assert settled.success and settled.transaction.startswith("0x") and settled.amount == str(payment.deposit.amount)
    state = settled.model_dump(by_alias=True)["extra"]["channelState"]
    assert state["balance"] == str(payment.deposit.amount)
    assert state["channelId"] == "0x" + payment.voucher.channel_id.hex()
    channels = local.contracts(0).client.contract("X402Channels", CHANNELS_ADDRESS)
    assert channels.functions.channels(payment.voucher.channel_id).call()[0] == payment.deposit.amount
    used = facilitator.verify(payload, requirements)  # its authorization is used: the deposit would revert
    assert not used.is_valid and used.invalid_reason == "invalid_batch_settlement_evm_deposit_simulation_failed"
    again = facilitator.settle(payload, requirements)
    assert not again.success and again.error_reason == "invalid_batch_settlement_evm_deposit_simulation_failed"

    # the SDK, told of the deposit, signs a voucher on it: valid; one above the deposit is not
    told = {"success": True, "transaction": settled.transaction, "network": kind.network, "amount": settled.amount,
            "extra": {"chargedAmount": "0", "channelState": {**state, "chargedCumulativeAmount": "0"}}}
    payer.answered(payment, told, payment.accepted_amount)
    voucher, requirements, payment = _facilitator_request(x402_node, payer, chat(x402_node, "blue"))
    assert payment.kind == "voucher"
    assert facilitator.verify(voucher, requirements).is_valid
    refused = facilitator.verify(_with_ceiling(voucher, payer_key(local, 6), 10**20), requirements)
    assert not refused.is_valid and refused.invalid_reason == "invalid_batch_settlement_evm_cumulative_exceeds_balance"

    elsewhere = requirements.model_copy(update={"pay_to": "0x" + "ee" * 20})
    refused = facilitator.verify(voucher, elsewhere)
    assert not refused.is_valid and refused.invalid_reason == "invalid_batch_settlement_evm_receiver_mismatch"
    claim = voucher.model_copy(update={"payload": {"type": "claim", "claims": []}})
    refused_claim = facilitator.settle(claim, requirements)
    assert not refused_claim.success
    assert refused_claim.error_reason == "invalid_batch_settlement_evm_unknown_settle_action"


def _with_ceiling(payload: PaymentPayload, key: str, ceiling: int) -> PaymentPayload:
    """The payload's voucher re-signed by its payer for another ceiling (a payer asking for more)."""
    raw = dict(payload.payload)
    channel = bytes.fromhex(raw["voucher"]["channelId"][2:])
    chain_id = int(str(payload.accepted.network).split(":")[1])
    signature = sign_digest(key, voucher_digest(channel, ceiling, chain_id))
    raw["voucher"] = {**raw["voucher"], "maxClaimableAmount": str(ceiling), "signature": "0x" + signature.hex()}
    return payload.model_copy(update={"payload": raw})


def _forged_deposit(payload: PaymentPayload) -> PaymentPayload:
    """The payload's deposit with its ERC-3009 authorization signed by someone else than the payer."""
    raw = json.loads(json.dumps(payload.payload))
    auth = raw["deposit"]["authorization"]["erc3009Authorization"]
    auth["signature"] = "0x" + sign_digest("0x" + "77" * 32, b"\x11" * 32).hex()
    return payload.model_copy(update={"payload": raw})


def test_the_facilitator_refuses_malformed_requests_plainly(x402_node: PaidNode) -> None:
    """Every malformed body is a 400 with the OpenAI error body (never a 5xx, never a transaction); one over
    64 KiB a 413."""
    url = f"{x402_node.base_url}/x402"
    good = {"x402Version": 2, "scheme": "batch-settlement"}
    bodies: list[Any] = [b"{not json", b"[1, 2]", {"x402Version": 2},
                         {"x402Version": 2, "paymentPayload": {"payload": 1}, "paymentRequirements": {}},
                         {"x402Version": 2, "paymentPayload": {**good, "payload": {}}, "paymentRequirements": {}},
                         {"x402Version": 2, "paymentRequirements": {},
                          "paymentPayload": {"x402Version": 2, "accepted": {"scheme": "batch-settlement"},
                                             "payload": {"type": "deposit", "channelConfig": {"salt": "0xzz"}}}}]
    for body in bodies:
        for path in ("verify", "settle"):
            sent = {"data": body} if isinstance(body, bytes) else {"json": body}
            resp = requests.post(f"{url}/{path}", timeout=30, headers={"Content-Type": "application/json"}, **sent)
            assert resp.status_code == 400, (path, body, resp.text)
            assert resp.json()["error"]["message"], resp.text
    for path in ("verify", "settle"):
        too_large = requests.post(f"{url}/{path}", data=b"x" * 70_000, timeout=30,
                                  headers={"Content-Type": "application/json"})
        assert too_large.status_code == 413 and too_large.json()["error"]["code"] == "request_too_large"
