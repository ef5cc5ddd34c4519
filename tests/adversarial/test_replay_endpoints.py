"""One signed body that both paid endpoints accept (extra fields are allowed): the voucher's
requestHash covers the body, not the path, so the same X-Payment and body may reach /v1/completions
and /v1/chat/completions. It buys one generation, charged once, and a retry on either endpoint gives
the payer back the answer it paid for, whole, in the shape it was bought in. Live node on anvil."""

from __future__ import annotations

import json

import httpx
import pytest

from node.client.payer import Payer
from tests.fixtures.paid_node import PaidNode

pytestmark = pytest.mark.chain
PATHS = ("/v1/completions", "/v1/chat/completions")


def _both_kinds(node: PaidNode, stream: bool) -> bytes:
    return json.dumps({"model": str(node.adapter_id), "prompt": "the sea is", "max_tokens": 6,
                       "messages": [{"role": "user", "content": "the sea is"}], "stream": stream}).encode()


def _post(node: PaidNode, path: str, body: bytes, header: str) -> httpx.Response:
    return httpx.post(node.base_url + path, content=body, timeout=60,
                      headers={"X-Payment": header, "Content-Type": "application/json"})


def _streamed_text(resp: httpx.Response) -> tuple[str, dict[str, object]]:
    """The text of a streamed answer (either kind) and its last JSON chunk; fails on an error event."""
    events = [line.removeprefix("data: ") for line in resp.text.splitlines() if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", resp.text[-300:]
    chunks = [json.loads(e) for e in events[:-1]]
    assert all("error" not in c for c in chunks), chunks
    text = "".join(c["choices"][0].get("text") or c["choices"][0].get("delta", {}).get("content") or ""
                   for c in chunks)
    return text, chunks[-1]


@pytest.mark.parametrize("first", PATHS)
def test_a_streamed_answer_replays_whole_on_the_other_endpoint_and_is_charged_once(paid_node: PaidNode,
                                                                                    first: str) -> None:
    lane = 80 + PATHS.index(first)
    payer = Payer(paid_node.payer_keys[0], paid_node.base_url)
    body = _both_kinds(paid_node, stream=True)
    header = payer.payment_header(body, lane)
    served = _post(paid_node, first, body, header)
    assert served.status_code == 200
    text, last = _streamed_text(served)
    other = PATHS[1 - PATHS.index(first)]
    again = _post(paid_node, other, body, header)
    assert again.status_code == 200 and again.headers.get("X-Idempotent-Replay") == "true"
    assert _streamed_text(again) == (text, last)
    assert int(payer.channel(lane)["chargedTotal"]) == int(last["receipt"]["fee"])  # type: ignore[index]


@pytest.mark.parametrize("first", PATHS)
def test_a_plain_answer_replays_on_the_other_endpoint_and_is_charged_once(paid_node: PaidNode, first: str) -> None:
    lane = 82 + PATHS.index(first)
    payer = Payer(paid_node.payer_keys[0], paid_node.base_url)
    body = _both_kinds(paid_node, stream=False)
    header = payer.payment_header(body, lane)
    served = _post(paid_node, first, body, header)
    again = _post(paid_node, PATHS[1 - PATHS.index(first)], body, header)
    assert served.status_code == again.status_code == 200
    assert again.json() == served.json()
    assert int(payer.channel(lane)["chargedTotal"]) == int(served.json()["receipt"]["fee"])
