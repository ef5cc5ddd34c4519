"""The voucher's requestHash covers the body, not the path, so the same X-Payment and body may be sent
to /v1/completions and to /v1/chat/completions. No body is served by both: each endpoint refuses the
other's fields (a field it would ignore is refused by name, never applied silently), before any hold.
So one voucher buys one generation, charged once, and a retry on its own endpoint gives the payer back
the answer it paid for, whole, in the shape it was bought in. Live node on anvil."""

from __future__ import annotations

import json

import httpx
import pytest

from node.client.payer import Payer
from tests.fixtures.paid_node import PaidNode

pytestmark = pytest.mark.chain
PATHS = ("/v1/completions", "/v1/chat/completions")
FIELD_OF = {"/v1/completions": "prompt", "/v1/chat/completions": "messages"}


def _body(node: PaidNode, path: str, stream: bool, both: bool = False) -> bytes:
    body: dict[str, object] = {"model": str(node.adapter_id), "max_tokens": 6, "stream": stream}
    if both or path == PATHS[0]:
        body["prompt"] = "the sea is"
    if both or path == PATHS[1]:
        body["messages"] = [{"role": "user", "content": "the sea is"}]
    return json.dumps(body).encode()


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
def test_a_body_with_both_endpoints_fields_is_refused_by_both_before_any_hold(paid_node: PaidNode,
                                                                              first: str) -> None:
    lane = 84 + PATHS.index(first)
    payer = Payer(paid_node.payer_keys[0], paid_node.base_url)
    body = _body(paid_node, first, stream=False, both=True)
    header = payer.payment_header(body, lane)
    for path in (first, PATHS[1 - PATHS.index(first)]):
        resp = _post(paid_node, path, body, header)
        other_field = FIELD_OF[PATHS[1 - PATHS.index(path)]]
        assert resp.status_code == 400 and resp.json()["error"]["param"] == other_field, resp.text
    assert int(payer.channel(lane)["chargedTotal"]) == 0


@pytest.mark.parametrize("first", PATHS)
@pytest.mark.parametrize("stream", [False, True])
def test_a_paid_answer_is_refused_on_the_other_endpoint_and_replays_whole_on_its_own(
        paid_node: PaidNode, first: str, stream: bool) -> None:
    lane = 80 + PATHS.index(first) + 2 * stream
    payer = Payer(paid_node.payer_keys[0], paid_node.base_url)
    body = _body(paid_node, first, stream)
    header = payer.payment_header(body, lane)
    served = _post(paid_node, first, body, header)
    assert served.status_code == 200
    answer = _streamed_text(served) if stream else served.json()
    other = _post(paid_node, PATHS[1 - PATHS.index(first)], body, header)
    assert other.status_code == 400  # its required field is missing: nothing generated, nothing charged
    again = _post(paid_node, first, body, header)
    assert again.status_code == 200 and again.headers.get("X-Idempotent-Replay") == "true"
    assert (_streamed_text(again) if stream else again.json()) == answer
    fee = answer[1]["receipt"]["fee"] if stream else answer["receipt"]["fee"]  # type: ignore[index]
    assert int(payer.channel(lane)["chargedTotal"]) == int(fee)
