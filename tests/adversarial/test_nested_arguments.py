"""An earlier tool call's arguments that nest a million levels deep, or write an integer of 5,000 digits,
are refused with a 400 naming `messages`: never a dead process, never a 500, nothing charged.

A chat request may carry the assistant's earlier tool calls, whose `arguments` is JSON text the node
parses to hand the chat template. py_ecc (imported by eth-keys) raises the interpreter's recursion limit
to 100,000, so `[` a million times, sent in a free quote with no key, overflowed the C stack while
parsing and the whole API process died (SIGSEGV): every paid request in flight with it. An integer longer
than Python converts raised a ValueError the handler did not take: a 500. Now the API process keeps a
recursion limit its stacks hold (node/api/app.py) and the parse refuses both by name. Live node on anvil."""

from __future__ import annotations

import base64
import json
import sys

import httpx
import pytest

from node.api.app import MAX_RECURSION_DEPTH
from node.client.payer import Payer
from tests.adversarial.attacker import Attacker
from tests.fixtures.paid_node import PaidNode

pytestmark = pytest.mark.chain
ARGUMENTS = {"a million levels": "[" * 1_000_000, "a 5,000-digit integer": '{"a": ' + "7" * 5_000 + "}"}


def _chat(paid_node: PaidNode, arguments: str) -> bytes:
    return json.dumps({"model": str(paid_node.adapter_id), "max_tokens": 2, "messages": [
        {"role": "user", "content": "add 1 and 2"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "add", "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "3"}]}).encode()


@pytest.mark.parametrize("case", list(ARGUMENTS))
def test_arguments_the_node_cannot_read_are_a_400_quoted_or_paid(paid_node: PaidNode, case: str) -> None:
    body = _chat(paid_node, ARGUMENTS[case])
    quote = httpx.post(f"{paid_node.base_url}/v1/quote/chat/completions", content=body, timeout=60,
                       headers={"Content-Type": "application/json"})
    assert quote.status_code == 400 and quote.json()["error"]["param"] == "messages", quote.text
    att, lane = Attacker(Payer(paid_node.payer_keys[1], paid_node.base_url), paid_node.base_url,
                         str(paid_node.adapter_id)), 3_200 + list(ARGUMENTS).index(case)
    paid = httpx.post(f"{paid_node.base_url}/v1/chat/completions", content=body, timeout=60,
                      headers={"X-Payment": att.header(body, lane), "Content-Type": "application/json"})
    assert paid.status_code == 400 and paid.json()["error"]["param"] == "messages", paid.text
    assert att.charged(lane) == 0
    served = _chat(paid_node, '{"a": 1, "b": 2}')  # the same chat, readable: the node is up and serves it
    answer = httpx.post(f"{paid_node.base_url}/v1/chat/completions", content=served, timeout=60,
                        headers={"X-Payment": att.header(served, lane), "Content-Type": "application/json"})
    assert answer.status_code == 200 and int(answer.json()["receipt"]["fee"]) == att.charged(lane) > 0


def test_the_api_keeps_a_recursion_limit_its_stacks_hold(paid_node: PaidNode) -> None:
    assert sys.getrecursionlimit() == MAX_RECURSION_DEPTH  # the serving process's (py_ecc set 100,000)


def test_x402_bodies_and_headers_nested_past_the_limit_are_a_400(x402_node: PaidNode) -> None:
    """The x402 facilitator's bodies (64 KiB, no key) and PAYMENT-SIGNATURE (16,384 characters) may nest
    deeper than MAX_RECURSION_DEPTH: a 400, as any text that is not their JSON."""
    nested = b"[" * 60_000
    for path in ("/x402/verify", "/x402/settle"):
        resp = httpx.post(f"{x402_node.base_url}{path}", content=nested, timeout=60,
                          headers={"Content-Type": "application/json"})
        assert resp.status_code == 400, resp.text
    header = base64.b64encode(b"[" * 12_000).decode()
    body = json.dumps({"model": str(x402_node.adapter_id), "prompt": "the sea", "max_tokens": 2}).encode()
    resp = httpx.post(f"{x402_node.base_url}/v1/completions", content=body, timeout=60,
                      headers={"PAYMENT-SIGNATURE": header, "Content-Type": "application/json"})
    assert resp.status_code == 400, resp.text
