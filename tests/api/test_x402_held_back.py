"""x402's streams follow the lanes' rule for a client that hangs up while the stream's text is held back (a
stop string's possible start): it is charged for the tokens generated, and the same payment sent again
returns the stored answer, free, with the text of every token charged and the channel's charge in its
PAYMENT-RESPONSE. Live node with batch-settlement on anvil; the engine's steps are slowed so the hang-up
lands while the text is held back."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
import requests

from tests.fixtures.paid_node import PaidNode
from tests.fixtures.x402_node import chat, decode, payer_key, payment_required
from tests.payment.x402.sdk import Payer

pytestmark = [pytest.mark.chain, pytest.mark.slow]
STEP_S = 0.15


@pytest.fixture
def slow_engine(x402_node: PaidNode) -> Iterator[None]:
    engine = x402_node.local.services.engine.engine  # type: ignore[union-attr]
    real = engine.step

    def step() -> object:
        time.sleep(STEP_S)
        return real()

    engine.step = step
    try:
        yield
    finally:
        del engine.step


def test_an_x402_stream_hung_up_while_its_text_is_held_back_is_charged_and_replays_it(
        x402_node: PaidNode, slow_engine: None) -> None:
    svc = x402_node.local.services
    assert svc is not None
    a = svc.engine.engine.tokenizer.convert_tokens_to_ids("a")
    body = chat(x402_node, "the sea", max_tokens=20, stream=True, temperature=0, logit_bias={str(a): 100},
                stop=["a" * 30 + "!"])
    payer = Payer(payer_key(x402_node.local, 2), x402_node.local.anvil.rpc_url, x402_node.local.deployment.chain_id)
    header, _ = payer.pay(payment_required(x402_node, body))
    url, headers = f"{x402_node.base_url}/v1/chat/completions", {"PAYMENT-SIGNATURE": header}
    with pytest.raises(requests.exceptions.RequestException), \
            requests.post(url, json=body, headers=headers, stream=True, timeout=(10, 8 * STEP_S)) as resp:
        assert resp.status_code == 200, resp.text
        lines = [line for line in resp.iter_lines() if line.startswith(b"data: {")]
        pytest.fail(f"the whole answer came before the client could leave: {lines[-1:]}")
    time.sleep(1.0)  # the hang-up's charge commits
    replay = requests.post(url, json=body, headers=headers, timeout=60)
    assert replay.status_code == 200 and replay.headers.get("X-Idempotent-Replay") == "true", replay.text
    events = [json.loads(line.removeprefix("data: ")) for line in replay.text.splitlines()
              if line.startswith("data: {")]
    text = "".join(c["delta"].get("content") or "" for e in events for c in e.get("choices", []))
    receipt = events[-1]["receipt"]
    assert 0 < receipt["completionTokens"] < 20 and text == "a" * receipt["completionTokens"], (text, receipt)
    charged = decode(replay.headers["PAYMENT-RESPONSE"])["extra"]["channelState"]["chargedCumulativeAmount"]
    assert int(charged) == int(receipt["chargedTotal"]) and int(receipt["fee"]) > 0
