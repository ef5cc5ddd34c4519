"""Both schemes, one epoch, every payee paid to the wei: a node deployed by `deploy_x402` (the channel
contracts mirrored by its indexer, its router read from the deployment), lane payers with our client and
x402 payers with the stock SDK over HTTP; one x402 payer takes a cooperative refund through
`GET /x402/refund`, another starts a timed withdrawal right after being served and the worker's guard
claims first. The epoch settles with no loss, every payee claims, and the table of who earned what
(`GET /v1/earnings`) is the split of every receipt's fee, to the wei (docs/x402.md)."""

from __future__ import annotations

import base64
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import requests
from eth_account import Account
from x402 import x402ClientSync
from x402.http.clients.requests import x402HTTPAdapter
from x402.mechanisms.evm.batch_settlement.client import BatchSettlementEvmScheme
from x402.mechanisms.evm.signers import EthAccountSignerWithRPC

from node.chain.contract_client import ContractClient
from node.client.payer import Payer as LanePayer
from node.devkit.local_node import OPERATOR, LocalNode
from node.payment.x402.typed import CHANNELS_ADDRESS
from node.payment.x402.wire import Payment
from node.settlement.claims import claim_all
from node.settlement.policy import EpochPolicy
from node.settlement.runtime import SettlementRuntime
from node.settlement.split import Lineage, SplitParams, split_fee
from tests.fixtures.paid_node import ADAPTER_OWNER, CONTRIBUTORS, LINEAGE_WEIGHTS, OWNER_SHARE_BPS, PaidNode
from tests.fixtures.paid_node import build_paid_node as build
from tests.fixtures.x402_node import settle_and_reconcile
from tests.payment.x402.sdk import Payer

pytestmark = [pytest.mark.chain, pytest.mark.slow]
SDK_PAYER, REFUNDER, LEAVER = 9, 10, 11  # anvil dev keys no other role of the paid node uses
DELAY = 86_400


@pytest.fixture(scope="module")
def node(tiny_model: Path, tiny_adapters: object, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PaidNode]:
    data_dir = tmp_path_factory.mktemp("x402-epoch")
    local = LocalNode.start_chain(data_dir, x402=True, prompt_token_price=10**9, completion_token_price=2 * 10**9,
                                  default_max_tokens=16)
    try:
        for who in (SDK_PAYER, REFUNDER, LEAVER):
            local.contracts(OPERATOR).token.mint(Account.from_key(local.anvil.keys[who]).address, 10**21)
        yield build(local, tiny_model, tiny_adapters.paths["sea-r8"], data_dir, max_in_flight=6)  # type: ignore[attr-defined]
    finally:
        local.stop()


def _scheme(node: PaidNode, who: int) -> tuple[BatchSettlementEvmScheme, requests.Session]:
    scheme = BatchSettlementEvmScheme(EthAccountSignerWithRPC(Account.from_key(node.local.anvil.keys[who]),
                                                              node.local.anvil.rpc_url))
    client = x402ClientSync().register(f"eip155:{node.local.deployment.chain_id}", scheme)
    client.set_spend_controls({"allowed_assets": True, "max_amount_per_payment": str(10**18)})
    session = requests.Session()
    session.mount("http://", x402HTTPAdapter(client))
    return scheme, session


def _chat(node: PaidNode, prompt: str) -> dict:
    return {"model": str(node.adapter_id), "messages": [{"role": "user", "content": prompt}], "max_tokens": 4}


def _fee(session: requests.Session, node: PaidNode, prompt: str) -> int:
    resp = session.post(f"{node.base_url}/v1/chat/completions", json=_chat(node, prompt), timeout=120)
    assert resp.status_code == 200, resp.text
    return int(resp.json()["receipt"]["fee"])


def _served_then_withdrawn(node: PaidNode) -> tuple[int, int, Payment]:
    """The leaver pays one request and asks to withdraw its whole deposit at once: (fee, deposit, config)."""
    local, body = node.local, _chat(node, "calm")
    required = requests.post(f"{node.base_url}/v1/chat/completions", json=body, timeout=30)
    assert required.status_code == 402
    payer = Payer(local.anvil.keys[LEAVER], local.anvil.rpc_url, local.deployment.chain_id)
    header, payment = payer.pay(json.loads(base64.b64decode(required.headers["PAYMENT-REQUIRED"])))
    resp = requests.post(f"{node.base_url}/v1/chat/completions", json=body, headers={"PAYMENT-SIGNATURE": header},
                         timeout=120)
    assert resp.status_code == 200, resp.text
    client = ContractClient(local.anvil.rpc_url, local.anvil.keys[LEAVER])
    channels = client.contract("X402Channels", CHANNELS_ADDRESS)
    client.transact(channels.functions.initiateWithdraw(payment.config.as_tuple(), payment.deposit.amount))
    return int(resp.json()["receipt"]["fee"]), payment.deposit.amount, payment


def test_both_schemes_settle_in_one_epoch_and_every_payee_is_paid_to_the_wei(node: PaidNode) -> None:
    local, ops = node.local, node.local.contracts(OPERATOR)
    me, router = ops.client.address, local.deployment.x402_router
    assert router is not None and local.settings.x402_router is None, "the router comes from the deployment"
    _, session = _scheme(node, SDK_PAYER)
    fees = [_fee(session, node, p) for p in ("the sea is", "blue")]
    lanes = LanePayer(node.payer_keys[0], node.base_url).openai(lane=3)
    for prompt in ("the sea", "calm"):
        out = lanes.completions.create(model=str(node.adapter_id), prompt=prompt, max_tokens=4)
        fees.append(int(out.model_extra["receipt"]["fee"]))

    refunder, refund_session = _scheme(node, REFUNDER)
    fees.append(_fee(refund_session, node, "sea"))
    refunded = refunder.refund(f"{node.base_url}/x402/refund")
    assert refunded.success and int(refunded.amount) > 0

    leaver_fee, deposit, leaver = _served_then_withdrawn(node)
    fees.append(leaver_fee)
    local.wait_for_mirror(final=False)
    service = SettlementRuntime.from_settings(local.settings, EpochPolicy(max_age_s=0)).service
    assert service.on_tick is not None
    report = service.on_tick()  # the worker's next tick: the withdrawing channel is claimed at once
    assert len(report.claimed) == 1 and not report.refused
    x402 = ContractClient(local.anvil.rpc_url).contract("X402Channels", CHANNELS_ADDRESS)
    channel_id = leaver.voucher.channel_id
    assert x402.functions.channels(channel_id).call()[1] == leaver_fee, "claimed within the delay"

    assert sorted(settle_and_reconcile(local)) == sorted(fees)

    paid = claim_all(ops, me, node.base_url).paid  # every payee, by anyone
    contributors = [local.contracts(c).client.address for c in CONTRIBUTORS]
    lineage = Lineage(local.contracts(ADAPTER_OWNER).client.address, OWNER_SHARE_BPS,
                      tuple(zip(contributors, LINEAGE_WEIGHTS, strict=True)))
    params = SplitParams(local.deployment.treasury, me, 500, 1_500)
    expected: Counter[str] = Counter()
    for fee in fees:
        expected.update(split_fee(fee, params, lineage))
    assert {a: v for a, v in paid.items() if v} == {a: v for a, v in expected.items() if v}
    assert sum(paid.values()) == sum(fees), "the pot pays out exactly what both schemes collected"
    local.wait_for_mirror(final=False)  # the table's `claimed` is the indexer's mirror of the claims
    for account, amount in expected.items():
        table = httpx.get(f"{node.base_url}/v1/earnings/{me}/{account}").json()
        assert (int(table["earned"]), int(table["claimed"])) == (amount, amount), account

    local.anvil.rpc("evm_increaseTime", DELAY + 1)
    local.anvil.rpc("evm_mine")
    token = ops.token
    before_exit = token.balance_of(leaver.config.payer)
    ContractClient(local.anvil.rpc_url, local.anvil.keys[LEAVER]).transact(
        x402.functions.finalizeWithdraw(leaver.config.as_tuple()))
    assert token.balance_of(leaver.config.payer) - before_exit == deposit - leaver_fee
