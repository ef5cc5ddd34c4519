"""An attacker with no escrow names an adapter the node has not loaded in a chat quote or a chat
request (its chat template is needed before the hold): the node must not fetch adapters for free
callers without bound. With the free callers' bucket empty they get 429 and the adapter stays unloaded;
a payer with escrow still gets it loaded and quoted. Live node on anvil."""

from __future__ import annotations

import json
import secrets

import httpx
import pytest

from node.api.cold_load import ColdLoadGate
from node.client.payer import Payer
from node.lora.provider import LoadState
from tests.fixtures.paid_node import PaidNode

pytestmark = pytest.mark.chain


def _chat(model: int) -> bytes:
    return json.dumps({"model": str(model), "messages": [{"role": "user", "content": "the sea"}],
                       "max_tokens": 2}).encode()


def test_callers_without_escrow_cannot_make_the_node_fetch_adapters_for_free(paid_node: PaidNode) -> None:
    services = paid_node.local.services
    assert services is not None
    generation, provider = services.generation, services.catalog.provider
    name = str(paid_node.adapter_id)
    assert provider.state(name) is not LoadState.READY, "the adapter must start unloaded for this test"
    free = generation.gate.cold_loads
    generation.gate.cold_loads = ColdLoadGate(provider, rate_per_s=0.0, burst=0)  # the bucket is empty
    try:
        body, headers = _chat(paid_node.adapter_id), {"Content-Type": "application/json"}
        quote = httpx.post(f"{paid_node.base_url}/v1/quote/chat/completions", content=body, headers=headers,
                           timeout=60)
        assert quote.status_code == 429 and quote.json()["error"]["code"] == "overloaded"

        nobody = Payer("0x" + secrets.token_hex(32), paid_node.base_url)  # a valid signature, no escrow
        paid = httpx.post(f"{paid_node.base_url}/v1/chat/completions", content=body, timeout=60,
                          headers={**headers, "X-Payment": nobody.payment_header(body, lane=0)})
        assert paid.status_code == 429
        assert provider.state(name) is not LoadState.READY  # nothing was fetched for them

        funded = Payer(paid_node.payer_keys[0], paid_node.base_url).address
        quoted = httpx.post(f"{paid_node.base_url}/v1/quote/chat/completions", content=body, headers=headers,
                            params={"payer": funded, "lane": 0}, timeout=60)
        assert quoted.status_code == 200 and int(quoted.json()["maxFee"]) > 0
        assert provider.state(name) is LoadState.READY

        again = httpx.post(f"{paid_node.base_url}/v1/quote/chat/completions", content=body, headers=headers,
                           timeout=60)
        assert again.status_code == 200  # loaded now: quoting it costs the node nothing
    finally:
        generation.gate.cold_loads = free


def test_the_free_callers_bucket_refills_at_its_rate() -> None:
    now = [0.0]

    class Cold:
        def state(self, adapter_id: str) -> LoadState:
            return LoadState.COLD

    gate = ColdLoadGate(Cold(), rate_per_s=2.0, burst=2, clock=lambda: now[0])  # type: ignore[arg-type]
    assert gate.free.take() and gate.free.take() and not gate.free.take()
    now[0] += 0.5  # one token back
    assert gate.free.take() and not gate.free.take()
