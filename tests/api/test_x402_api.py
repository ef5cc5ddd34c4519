"""A live node paid by the stock x402 SDK (its `requests` adapter: 402 -> pay -> retry -> PAYMENT-RESPONSE)
with batch-settlement on anvil, next to our lanes (docs/x402.md): the 402 lists both schemes, the SDK
deposits through the node, pays chat completions on the running total, each answer carries our signed
receipt and a PAYMENT-RESPONSE whose charge is the receipt's fee."""

from __future__ import annotations

from collections import Counter

import pytest
import requests
from eth_account import Account
from sqlalchemy import select

from node.chain.contract_client import ContractClient
from node.client.payer import Payer as LanePayer
from node.db.models import EpochState, Loss
from node.devkit.local_node import OPERATOR
from node.payment.x402.typed import CHANNELS_ADDRESS
from node.settlement.policy import EpochPolicy
from node.settlement.runtime import SettlementRuntime
from tests.fixtures.paid_node import PaidNode
from tests.fixtures.x402_node import chat, decode, payer_key, payment_required, sdk_session, settle_and_reconcile
from tests.payment.x402.sdk import Payer

pytestmark = [pytest.mark.chain, pytest.mark.slow]


def test_an_unpaid_request_gets_402_with_both_schemes(x402_node: PaidNode) -> None:
    body = {"model": str(x402_node.adapter_id), "messages": [{"role": "user", "content": "sea"}], "max_tokens": 4}
    resp = requests.post(f"{x402_node.base_url}/v1/chat/completions", json=body, timeout=30)
    assert resp.status_code == 402, resp.text
    required = decode(resp.headers["PAYMENT-REQUIRED"])
    assert required["x402Version"] == 2
    schemes = {a["scheme"]: a for a in required["accepts"]}
    assert set(schemes) == {"loranode-lane", "batch-settlement"}
    offer = schemes["batch-settlement"]
    assert offer["network"] == f"eip155:{x402_node.local.deployment.chain_id}" and int(offer["amount"]) > 0
    assert offer["extra"]["name"] == "loranode demo token" and offer["extra"]["version"] == "1"
    assert offer["extra"]["withdrawDelay"] == 86_400
    assert resp.json()["error"]["code"] == "payment_required"


def test_the_sdk_pays_chat_completions_and_gets_receipts(x402_node: PaidNode) -> None:
    session = sdk_session(x402_node)
    charged = 0
    for prompt in ("the sea", "calm and blue"):
        body = {"model": str(x402_node.adapter_id), "messages": [{"role": "user", "content": prompt}],
                "max_tokens": 4}
        resp = session.post(f"{x402_node.base_url}/v1/chat/completions", json=body, timeout=120)
        assert resp.status_code == 200, resp.text
        receipt = resp.json()["receipt"]
        settle = decode(resp.headers["PAYMENT-RESPONSE"])
        assert settle["success"] and settle["extra"]["chargedAmount"] == receipt["fee"]
        charged += int(receipt["fee"])
        assert settle["extra"]["channelState"]["chargedCumulativeAmount"] == str(charged)
        assert receipt["chargedTotal"] == str(charged)



def _paid(node: PaidNode, body: dict, header: str) -> requests.Response:
    return requests.post(f"{node.base_url}/v1/chat/completions", json=body, headers={"PAYMENT-SIGNATURE": header},
                         timeout=120)


def test_a_replayed_voucher_is_never_served_twice(x402_node: PaidNode) -> None:
    key = payer_key(x402_node.local, 1)  # a channel of its own
    x402_node.local.contracts(OPERATOR).token.mint(Account.from_key(key).address, 10**21)
    payer = Payer(key, x402_node.local.anvil.rpc_url, x402_node.local.deployment.chain_id)
    body = chat(x402_node, "the sea")
    header, _ = payer.pay(payment_required(x402_node, body))
    first = _paid(x402_node, body, header)
    assert first.status_code == 200, first.text
    charged = first.json()["receipt"]["chargedTotal"]
    again = _paid(x402_node, body, header)  # the same request: its stored answer, free (not generated again)
    assert again.status_code == 200 and again.headers["X-Idempotent-Replay"] == "true", again.text
    assert again.json() == first.json()
    assert decode(again.headers["PAYMENT-RESPONSE"])["extra"]["channelState"]["chargedCumulativeAmount"] == charged
    for prompt in ("the sky", "the sky"):  # another request: a loop of stale vouchers costs the node nothing
        again = _paid(x402_node, chat(x402_node, prompt), header)
        assert again.status_code == 402, again.text
        corrective = decode(again.headers["PAYMENT-REQUIRED"])
        assert corrective["error"] == "invalid_batch_settlement_evm_cumulative_amount_mismatch"
        offer = next(a for a in corrective["accepts"] if a["scheme"] == "batch-settlement")
        assert offer["extra"]["channelState"]["chargedCumulativeAmount"] == charged
        assert offer["extra"]["voucherState"]["signedMaxClaimable"]


def test_a_channel_paying_someone_else_is_refused(x402_node: PaidNode) -> None:
    payer = Payer(payer_key(x402_node.local, 0), x402_node.local.anvil.rpc_url, x402_node.local.deployment.chain_id)
    body = chat(x402_node, "blue")
    required = payment_required(x402_node, body)
    for offer in required["accepts"]:
        offer["payTo"] = "0x" + "ee" * 20  # the client's channel pays another receiver
    header, _ = payer.pay(required)
    resp = _paid(x402_node, body, header)
    assert resp.status_code == 402
    assert decode(resp.headers["PAYMENT-REQUIRED"])["error"] == "invalid_batch_settlement_evm_receiver_mismatch"


def test_one_epoch_settles_both_schemes_and_a_contributor_claims_its_share(x402_node: PaidNode) -> None:
    """x402 and lane payers in one epoch: the worker sweeps the channels into the router's escrow, settle
    collects the router lane with the lanes, and the pot and the split reconcile to the wei."""
    fees = []
    session = sdk_session(x402_node)
    for prompt in ("the sea is", "blue"):
        resp = session.post(f"{x402_node.base_url}/v1/chat/completions", json=chat(x402_node, prompt), timeout=120)
        assert resp.status_code == 200, resp.text
        fees.append(int(resp.json()["receipt"]["fee"]))
    lane_client = LanePayer(x402_node.payer_keys[0], x402_node.base_url).openai(lane=7)
    out = lane_client.completions.create(model=str(x402_node.adapter_id), prompt="the sea", max_tokens=4)
    fees.append(int(out.model_extra["receipt"]["fee"]))

    in_epoch = settle_and_reconcile(x402_node.local)
    assert Counter(fees) <= Counter(in_epoch), "this module's earlier receipts are in the epoch too"


def test_a_payer_who_withdraws_after_being_served_cannot_stop_the_others_being_paid(x402_node: PaidNode) -> None:
    """Two x402 payers served in one epoch; one withdraws everything before the node claims (the delay
    passes before the epoch settles). Its receipts become a loss of its own lane; the other's are
    collected, and the epoch settles."""
    local = x402_node.local
    ops = local.contracts(OPERATOR)
    node = ops.client.address
    keys = [payer_key(x402_node.local, 2), payer_key(x402_node.local, 3)]
    served: list[dict] = []
    for key in keys:
        ops.token.mint(Account.from_key(key).address, 10**21)
        payer = Payer(key, local.anvil.rpc_url, local.deployment.chain_id)
        body = chat(x402_node, "calm")
        header, payment = payer.pay(payment_required(x402_node, body))
        resp = _paid(x402_node, body, header)
        assert resp.status_code == 200, resp.text
        served.append({"payment": payment, "fee": int(resp.json()["receipt"]["fee"]), "key": key})
    leaver = served[0]
    client = ContractClient(local.anvil.rpc_url, leaver["key"])
    channels = client.contract("X402Channels", CHANNELS_ADDRESS)
    config = leaver["payment"].config.as_tuple()
    client.transact(channels.functions.initiateWithdraw(config, leaver["payment"].deposit.amount))
    local.anvil.rpc("evm_increaseTime", 86_401)
    local.anvil.rpc("evm_mine")
    client.transact(channels.functions.finalizeWithdraw(config))

    before = ops.settlement.rewards_total(node)
    service = SettlementRuntime.from_settings(local.settings, EpochPolicy(max_age_s=0)).service
    service.reconcile()
    epoch_id = service.close_epoch()
    assert epoch_id is not None and service.run_until_final(epoch_id, timeout_s=90) is EpochState.FINAL
    assert ops.settlement.rewards_total(node) - before == served[1]["fee"], "the other payer's fee collected"
    with local.services.db() as db:  # type: ignore[union-attr]
        losses = db.scalars(select(Loss)).all()
    assert [(loss.amount, loss.reason) for loss in losses] == [(leaver["fee"], "escrow_short")]
