"""A free chat quote of many empty messages cannot stall the API for paying users.

A quote needs no key and no escrow, and counts a chat's prompt by rendering it with the chat template. A
short prompt is rendered and tokenized on the event loop (a thread hop costs more than it); what made a
prompt short was the characters of its messages' text only. A body of 20,000 messages with empty content
has none, so its template ran on the event loop: 0.2-0.7 s of it per quote (30,000 messages, the tiny
model's template) before the rendered text was refused as too long, every other request of the node, paid
ones included, waiting meanwhile. Now every message, tool call and tool counts toward what the template
has to render, and such a prompt is rendered on the tokenizing threads. Live node on anvil; the test holds
the big render where it runs and asks for a paid answer meanwhile."""

from __future__ import annotations

import json
import threading
from typing import Any

import httpx
import pytest

from node.client.payer import Payer
from tests.fixtures.flood import signed_completions
from tests.fixtures.paid_node import PaidNode

pytestmark = pytest.mark.chain
NUM_MESSAGES = 20_000


def test_a_paid_request_is_served_while_a_quote_of_many_empty_messages_renders(paid_node: PaidNode) -> None:
    svc = paid_node.local.services
    assert svc is not None
    engine, rendering, release = svc.engine, threading.Event(), threading.Event()
    encode_chat = engine.encode_chat

    def held(messages: list[dict[str, Any]], template: str | None = None,
             tools: list[dict[str, Any]] | None = None) -> list[int]:
        if len(messages) >= NUM_MESSAGES:  # the stranger's render: held until the paid request is answered
            rendering.set()
            release.wait(60)
        return encode_chat(messages, template, tools)

    body, header = signed_completions(paid_node, Payer(paid_node.payer_keys[0], paid_node.base_url), 720)[0]
    many = json.dumps({"model": str(paid_node.adapter_id), "max_tokens": 1,
                       "messages": [{"role": "user", "content": ""}] * NUM_MESSAGES}).encode()
    quoted: list[httpx.Response] = []
    quote = threading.Thread(target=lambda: quoted.append(httpx.post(
        f"{paid_node.base_url}/v1/quote/chat/completions", content=many, timeout=120,
        headers={"Content-Type": "application/json"})))
    engine.encode_chat = held  # type: ignore[method-assign]
    try:
        quote.start()
        assert rendering.wait(30), "the quote never reached its template"
        try:
            paid = httpx.post(f"{paid_node.base_url}/v1/completions", content=body, timeout=10,
                              headers={"X-Payment": header, "Content-Type": "application/json"})
        except httpx.TimeoutException:
            pytest.fail("a paid request waited for a free quote's template: it rendered on the event loop")
    finally:
        release.set()
        del engine.encode_chat  # the class's own again
        quote.join(60)
    assert paid.status_code == 200, paid.text
    assert quoted and quoted[0].status_code == 413, quoted  # rendered, then refused as too long for the model
