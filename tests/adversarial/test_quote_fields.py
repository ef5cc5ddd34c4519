"""Every request field that changes what a request costs changes its quote exactly as it changes the
hold: a client that signs one unit less than `chargedTotal + maxFee` is refused before any work (402),
and one that signs exactly that is served and charged no more, whatever it asks for: n choices, tools
the chat template writes into the prompt, a response format, logprobs, min_tokens and stop strings, or
the base model at its own prices. The receipt's prompt tokens are the quote's (counted after the chat
template, tools included). Live node on anvil."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest

from node.client.payer import Payer
from node.protocol.voucher import SignedVoucher, Voucher, request_hash, sign_voucher
from tests.fixtures.paid_node import PaidNode

pytestmark = pytest.mark.chain
USER = [{"role": "user", "content": "the sea"}]
ADD = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}
TOOLS = [{"type": "function", "function": {"name": "add", "description": "adds two numbers", "parameters": ADD}}]
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "n choices": ("completions", {"prompt": "the sea", "max_tokens": 3, "n": 3}),
    "logprobs, min_tokens, stop": ("completions", {"prompt": "the sea", "max_tokens": 4, "logprobs": 3,
                                                   "min_tokens": 4, "stop": ["."]}),
    "chat n choices": ("chat/completions", {"messages": USER, "max_completion_tokens": 3, "n": 2}),
    "tools in the prompt": ("chat/completions", {"messages": USER, "max_completion_tokens": 3, "tools": TOOLS}),
    "forced tool call": ("chat/completions", {"messages": USER, "max_completion_tokens": 30, "tools": TOOLS,
                                              "tool_choice": "required"}),
    "response format": ("chat/completions", {"messages": USER, "max_tokens": 5,
                                             "response_format": {"type": "json_object"}}),
    "the base model, n choices": ("completions", {"prompt": "the sea", "max_tokens": 2, "n": 2, "model": "base"}),
}


def _post(node: PaidNode, path: str, body: bytes, lane: int, cumulative: int) -> httpx.Response:
    payer = Payer(node.payer_keys[1], node.base_url)
    voucher = Voucher(payer=payer.address, node=payer.info.node, lane=lane, cumulative=cumulative,
                      request_hash=request_hash(body), deadline=int(time.time()) + 3_600)
    header = SignedVoucher.of(voucher, sign_voucher(node.payer_keys[1], voucher, payer.info.domain)).encode()
    return httpx.post(f"{node.base_url}/v1/{path}", content=body, timeout=120,
                      headers={"Content-Type": "application/json", "X-Payment": header})


@pytest.mark.parametrize("case", list(CASES))
def test_a_voucher_for_the_quote_of_a_body_pays_for_it_and_one_unit_less_does_not(paid_node: PaidNode,
                                                                                   case: str) -> None:
    path, fields = CASES[case]
    lane = 160 + list(CASES).index(case)
    model = paid_node.local.settings.resolved_served_model_name() if fields.get("model") == "base" \
        else str(paid_node.adapter_id)
    body = json.dumps({**fields, "model": model, "temperature": 0}).encode()
    quote = httpx.post(f"{paid_node.base_url}/v1/quote/{path}", content=body, timeout=60,
                       params={"payer": Payer(paid_node.payer_keys[1], paid_node.base_url).address, "lane": lane})
    assert quote.status_code == 200, quote.text
    charged, max_fee = int(quote.json()["chargedTotal"]), int(quote.json()["maxFee"])
    short = _post(paid_node, path, body, lane, charged + max_fee - 1)
    assert short.status_code == 402 and short.json()["error"]["code"] == "insufficient_escrow", short.text
    served = _post(paid_node, path, body, lane, charged + max_fee)
    assert served.status_code == 200, served.text
    receipt, usage = served.json()["receipt"], served.json()["usage"]
    assert receipt["promptTokens"] == usage["prompt_tokens"] == quote.json()["promptTokens"]
    assert usage["completion_tokens"] <= quote.json()["maxTokens"] * fields.get("n", 1)
    assert int(receipt["fee"]) <= max_fee and int(receipt["chargedTotal"]) == charged + int(receipt["fee"])


def test_tools_the_template_writes_into_the_prompt_are_quoted_and_paid_as_prompt(paid_node: PaidNode) -> None:
    def prompt_tokens(**extra: Any) -> int:
        body = {"model": str(paid_node.adapter_id), "messages": USER, "max_tokens": 2, **extra}
        return int(httpx.post(f"{paid_node.base_url}/v1/quote/chat/completions", json=body).json()["promptTokens"])

    plain = prompt_tokens()
    assert prompt_tokens(tools=TOOLS) > plain + 5  # the tool definitions are part of the prompt paid for
    assert prompt_tokens(tools=TOOLS, tool_choice="none") == plain  # not offered: not in the prompt
