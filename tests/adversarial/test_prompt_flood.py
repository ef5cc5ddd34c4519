"""A stranger with no escrow cannot stall the API for everyone with huge prompts.

Only a valid signature is needed to reach tokenization (any fresh key, no deposit). A prompt longer
than any text that fits the context is refused (413) before it is tokenized, and a long one is
tokenized off the event loop, so /health and paid requests keep being answered. Live node on anvil."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from eth_account import Account

from node.client.payer import Payer
from tests.fixtures.paid_node import PaidNode

pytestmark = pytest.mark.chain
FLOOD = 6


def test_a_stranger_without_escrow_cannot_stall_the_api_with_huge_prompts(paid_node: PaidNode) -> None:
    stranger = Payer(Account.create().key.hex(), paid_node.base_url, budget=10**30)
    body = json.dumps({"model": str(paid_node.adapter_id), "prompt": "sea " * 250_000, "max_tokens": 1}).encode()
    codes: list[int] = []

    def flood(lane: int) -> None:
        headers = {"X-Payment": stranger.payment_header(body, lane), "Content-Type": "application/json"}
        resp = httpx.post(f"{paid_node.base_url}/v1/completions", content=body, timeout=120, headers=headers)
        codes.append(resp.status_code)

    threads = [threading.Thread(target=flood, args=(lane,)) for lane in range(FLOOD)]
    for t in threads:
        t.start()
    time.sleep(0.5)  # the bodies are uploaded and the first is being tokenized
    started = time.monotonic()
    assert httpx.get(f"{paid_node.base_url}/health", timeout=120).status_code == 200
    waited = time.monotonic() - started
    for t in threads:
        t.join()
    assert codes == [413] * FLOOD, codes  # refused before tokenizing, nothing served
    assert waited < 1.0, f"the API did not answer /health for {waited:.1f} s during {FLOOD} unfunded requests"


def test_a_prompt_longer_than_any_that_fits_is_refused_by_its_length(paid_node: PaidNode) -> None:
    payer = Payer(paid_node.payer_keys[0], paid_node.base_url)
    body = json.dumps({"model": str(paid_node.adapter_id), "prompt": "sea " * 250_000, "max_tokens": 1}).encode()
    resp = httpx.post(f"{paid_node.base_url}/v1/completions", content=body, timeout=60,
                      headers={"X-Payment": payer.payment_header(body, 90), "Content-Type": "application/json"})
    assert resp.status_code == 413
    assert "1000000 characters" in resp.json()["error"]["message"]
