"""An x402 payer's hang-ups before its first token spend the budget of its channel, as a lane payer's spend
its address's (node/api/hang_up_budget.py): a channel that keeps hanging up during its compiles is refused
(429 `hang_up_budget_spent`) before any more compile. Live node with batch-settlement on anvil; each
compile slowed so the hang-up lands during it; a budget of BURST hang-ups that never refills."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import requests

from tests.fixtures.paid_node import PaidNode
from tests.fixtures.slow_compile import slow_compiles, wait_ended
from tests.fixtures.x402_node import chat, decode, payer_key, payment_required
from tests.payment.x402.sdk import Payer

pytestmark = [pytest.mark.chain, pytest.mark.slow]
COMPILE_S, BURST = 1.0, 2


@pytest.fixture
def slow_budget(x402_node: PaidNode) -> Iterator[None]:
    """Every compile takes COMPILE_S longer; the budget: BURST hang-ups, shared and per buyer, no refill."""
    with slow_compiles(x402_node, COMPILE_S, BURST):
        yield


def _structured(node: PaidNode, tag: str) -> dict[str, Any]:
    schema = {"type": "object", "properties": {"city": {"enum": ["Oslo", "Lima"]}}, "required": ["city"],
              "title": tag}  # a distinct schema each time: never a cached compile
    return chat(node, "a trip", max_tokens=8, stream=True,
                response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}})


def _send(node: PaidNode, body: dict[str, Any], header: str, read_s: float) -> requests.Response | None:
    """The response, or None when the client gave up (closed the connection) after `read_s` without one."""
    try:
        return requests.post(f"{node.base_url}/v1/chat/completions", json=body, timeout=(10, read_s),
                             headers={"PAYMENT-SIGNATURE": header})
    except requests.exceptions.ReadTimeout:
        return None


def test_an_x402_channel_hanging_up_during_its_compiles_spends_its_budget_then_is_refused(
        x402_node: PaidNode, slow_budget: None) -> None:
    local = x402_node.local
    payer = Payer(payer_key(local, 0), local.anvil.rpc_url, local.deployment.chain_id)
    warm = chat(x402_node, "the sea")
    required = payment_required(x402_node, warm)
    header, payment = payer.pay(required)  # opens the channel (a deposit) with a purchase: a buyer here
    first = requests.post(f"{x402_node.base_url}/v1/chat/completions", json=warm, timeout=120,
                          headers={"PAYMENT-SIGNATURE": header})
    assert first.status_code == 200, first.text
    payer.answered(payment, decode(first.headers["PAYMENT-RESPONSE"]),
                   int(next(a for a in required["accepts"] if a["scheme"] == "batch-settlement")["amount"]))

    outcomes, refused = [], []
    for i in range(BURST + 2):
        body = _structured(x402_node, f"x402-{i}")
        header, _ = payer.pay(payment_required(x402_node, body))  # a hang-up charges nothing: the same total
        resp = _send(x402_node, body, header, read_s=0.3)
        outcomes.append(None if resp is None else resp.status_code)
        if resp is None:
            wait_ended(x402_node)  # its compile ends, its hold is released and its hang-up counted
        else:
            refused.append(resp)
    assert outcomes == [None] * BURST + [429, 429], outcomes
    error = refused[-1].json()["error"]
    assert error["code"] == "hang_up_budget_spent" and int(refused[-1].headers["Retry-After"]) >= 1
