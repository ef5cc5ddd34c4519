"""Cold adapter loads that nobody pays for, from callers the node counts as paying: a quote naming
someone else's funded address, and a funded payer whose vouchers never buy anything, must not make the
node fetch adapter after adapter; an x402 channel with a deposit is a paying caller like a lane payer.
Live node on anvil with x402 (on PostgreSQL when configured: budgets read escrow and channel balances
from the database), several registered adapters that start unloaded, the free callers' bucket empty."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from node.client.payer import Payer as LanePayer
from node.lora.content_hash import adapter_weights_sha256, base_model_id
from node.lora.provider import LoadState
from tests.fixtures.paid_node import ADAPTER_OWNER, LINEAGE_WEIGHTS, OWNER_SHARE_BPS, PaidNode
from tests.fixtures.x402_node import running_x402_node
from tests.payment.x402.sdk import Payer as X402Payer

pytestmark = [pytest.mark.chain, pytest.mark.slow]
X402_PAYER = 15  # an anvil dev key no other role of the paid node uses
NUM_COLD = 7  # 0-2 for quotes, 3-5 for vouchers, 6 for x402


@pytest.fixture(scope="module")
def node(tiny_model: Path, tiny_adapters: Any, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[tuple[PaidNode, list[int]]]:
    """An x402 node with NUM_COLD more adapters (the same files, ids of their own) none of which is loaded."""
    path = tiny_adapters.paths["sea-r8"]
    with running_x402_node(tiny_model, path, tmp_path_factory.mktemp("cold-budget"), [X402_PAYER]) as paid:
        owner = paid.local.contracts(ADAPTER_OWNER)
        cold = [owner.adapters.register(base_model_id(tiny_model), adapter_weights_sha256(path), path.as_uri(),
                                        list(paid.dataset_ids), list(LINEAGE_WEIGHTS), OWNER_SHARE_BPS)
                for _ in range(NUM_COLD)]
        paid.local.wait_for_mirror()
        yield paid, cold


@pytest.fixture
def gate(node: tuple[PaidNode, list[int]]) -> Iterator[Any]:
    """The node's gate with the free callers' bucket empty and a budget of 2 unpaid cold loads a caller."""
    services = node[0].local.services
    assert services is not None
    gate = services.generation.gate.cold_loads
    saved = (gate.free.rate_per_s, gate.free.tokens, gate.per_payer)
    gate.free.rate_per_s, gate.free.tokens, gate.per_payer = 0.0, 0.0, 2
    yield gate
    gate.free.rate_per_s, gate.free.tokens, gate.per_payer = saved


def _body(model: int, prompt: str = "the sea") -> dict[str, Any]:
    return {"model": str(model), "messages": [{"role": "user", "content": prompt}], "max_tokens": 2}


def _state(paid: PaidNode, adapter: int) -> LoadState:
    services = paid.local.services
    assert services is not None
    return services.catalog.provider.state(str(adapter))


def test_a_quote_naming_a_funded_payer_fetches_only_a_few_adapters(node: tuple[PaidNode, list[int]],
                                                                   gate: Any) -> None:
    """The attacker has no escrow and names the funded payer's address in chat quotes: before, every
    quote fetched its adapter at once."""
    paid, cold = node
    victim = LanePayer(paid.payer_keys[0], paid.base_url).address
    codes = [httpx.post(f"{paid.base_url}/v1/quote/chat/completions", json=_body(a),
                        params={"payer": victim, "lane": 0}, timeout=60).status_code for a in cold[:3]]
    assert codes == [200, 200, 429]
    assert _state(paid, cold[2]) is not LoadState.READY


def test_a_funded_payer_whose_vouchers_never_buy_gets_a_few_loads_then_buys_more(
        node: tuple[PaidNode, list[int]], gate: Any) -> None:
    """Each voucher is signed but too small to hold the request (402 after the load): before, a funded
    payer could fetch every adapter this way. The victim's quotes above did not spend this budget, and
    a purchase renews it."""
    paid, cold = node
    cheap = LanePayer(paid.payer_keys[0], paid.base_url, budget=1)  # signs chargedTotal + 1: never enough
    codes = []
    for adapter in cold[3:6]:
        body = json.dumps(_body(adapter)).encode()
        codes.append(httpx.post(f"{paid.base_url}/v1/chat/completions", content=body, timeout=60,
                                headers={"Content-Type": "application/json",
                                         "X-Payment": cheap.payment_header(body, lane=3)}).status_code)
    assert codes == [402, 402, 429]
    assert _state(paid, cold[5]) is not LoadState.READY

    buyer = LanePayer(paid.payer_keys[0], paid.base_url).openai(lane=4)
    bought = buyer.chat.completions.create(**_body(cold[0], "calm"))  # loaded already: a purchase
    assert int(bought.model_extra["receipt"]["fee"]) > 0
    body = json.dumps(_body(cold[5])).encode()
    again = httpx.post(f"{paid.base_url}/v1/chat/completions", content=body, timeout=60,
                       headers={"Content-Type": "application/json", "X-Payment": cheap.payment_header(body, lane=3)})
    assert again.status_code == 402 and _state(paid, cold[5]) is LoadState.READY


def test_an_x402_paid_request_is_a_paying_caller_not_a_free_one(node: tuple[PaidNode, list[int]],
                                                                gate: Any) -> None:
    """A channel with a deposit pays for a chat with an adapter not loaded: before, its request went
    through the free callers' bucket (429 here)."""
    paid, cold = node
    local = paid.local
    payer = X402Payer(local.anvil.keys[X402_PAYER], local.anvil.rpc_url, local.deployment.chain_id)
    warm = _body(paid.adapter_id)
    gate.free.tokens = 1.0  # one free load: the unpaid request that asks the price loads this adapter
    unpaid = httpx.post(f"{paid.base_url}/v1/chat/completions", json=warm, timeout=60)
    assert unpaid.status_code == 402, unpaid.text
    required = json.loads(base64.b64decode(unpaid.headers["PAYMENT-REQUIRED"]))
    header, payment = payer.pay(required)  # the first payment deposits into the channel
    first = httpx.post(f"{paid.base_url}/v1/chat/completions", json=warm, timeout=120,
                       headers={"PAYMENT-SIGNATURE": header})
    assert first.status_code == 200, first.text
    payer.answered(payment, json.loads(base64.b64decode(first.headers["PAYMENT-RESPONSE"])),
                   int(next(a for a in required["accepts"] if a["scheme"] == "batch-settlement")["amount"]))

    assert _state(paid, cold[6]) is not LoadState.READY
    header, _ = payer.pay(required)  # the same shape of request, on an adapter not loaded
    resp = httpx.post(f"{paid.base_url}/v1/chat/completions", json=_body(cold[6]), timeout=120,
                      headers={"PAYMENT-SIGNATURE": header})
    assert resp.status_code == 200, resp.text

