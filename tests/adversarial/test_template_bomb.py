"""An adapter whose chat template never finishes rendering cannot stop the node serving paying users.
A template is its adapter owner's code, rendered before any hold (it counts the prompt): an 81-character
one of two nested loops renders for hours. Free chat quotes naming such an adapter each took one of the
API's threads for good (and the GIL), until the paid path's holds, which run on those threads, never
ran: every paying user timed out. Now adapters' templates render in worker processes with a time limit
(400 chat_template_error, the workers replaced), and only a few renders wait at once (429 beyond).
Live node on anvil; the adapter is registered on chain by its owner, as anyone can."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import httpx
import pytest

from node.client.payer import Payer
from tests.fixtures.paid_node import PaidNode, register_templated

pytestmark = pytest.mark.chain
ENDLESS = "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}x"
NUM_QUOTES = 8  # more than the API's threads on a small machine


def test_an_endless_adapter_template_cannot_stop_paid_requests(paid_node: PaidNode, tiny_model: Path,
                                                               tmp_path: Path) -> None:
    endless = register_templated(paid_node, tiny_model, tmp_path / "endless", ENDLESS)
    quote = json.dumps({"model": str(endless), "messages": [{"role": "user", "content": "hi"}]}).encode()
    refusals: list[int] = []

    def ask() -> None:
        try:
            resp = httpx.post(f"{paid_node.base_url}/v1/quote/chat/completions", content=quote, timeout=60,
                              headers={"Content-Type": "application/json"})
            refusals.append(resp.status_code)
        except httpx.TimeoutException:
            refusals.append(0)

    askers = [threading.Thread(target=ask) for _ in range(NUM_QUOTES)]
    for thread in askers:
        thread.start()
    payer = Payer(paid_node.payer_keys[0], paid_node.base_url)
    body = json.dumps({"model": str(paid_node.adapter_id), "prompt": "the sea", "max_tokens": 2}).encode()
    try:
        paid = httpx.post(f"{paid_node.base_url}/v1/completions", content=body, timeout=30,
                          headers={"X-Payment": payer.payment_header(body, 61, "/v1/completions"),
                                   "Content-Type": "application/json"})
    except httpx.TimeoutException:
        pytest.fail("a paying user's request hung while free quotes rendered an endless template")
    for thread in askers:
        thread.join(90)
    assert paid.status_code == 200, paid.text
    assert refusals and set(refusals) <= {400, 429} and 400 in refusals, refusals  # refused, none hung
