"""A poison schema: `"pattern": "^\\n$"` asks xgrammar for a raw newline inside a JSON string, which the
engine's JSON masks forbid, so after the opening quote no token is allowed. Sampling that row raised
(NaN probabilities) and failed the engine step: every request in the batch, anyone's, ended as a node
fault (nothing charged; the attacker's streamed tokens free), as often as a funded payer sent it, with
the engine in the API process and in its own core process alike. Now that answer alone ends at its
dead end, charged for its tokens as a cut answer is (finish "length"), and every other request goes on.
Real anvil, contracts, API, HTTP, and core process."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from node.client.payer import Payer
from node.devkit.local_node import LocalNode
from tests.adversarial.attacker import Attacker
from tests.fixtures.paid_node import PaidNode, build_paid_node

pytestmark = pytest.mark.chain
POISON = {"type": "json_schema", "json_schema": {"name": "poison", "schema": {"type": "string", "pattern": "^\n$"}}}
HONEST_TOKENS = 1_000  # still being generated when the poison arrives


@pytest.fixture(scope="module", params=["in-process", "core-process"])
def node(request: pytest.FixtureRequest, tiny_model: Path, tiny_adapters: object,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[PaidNode]:
    data_dir = tmp_path_factory.mktemp(f"dead-end-{request.param}")
    local = LocalNode.start_chain(data_dir, prompt_token_price=10**9, completion_token_price=2 * 10**9)
    try:
        yield build_paid_node(local, tiny_model, tiny_adapters.paths["sea-r8"], data_dir,  # type: ignore[attr-defined]
                              max_in_flight=8, engine_process=request.param == "core-process")
    finally:
        local.stop()


def _poison(node: PaidNode, payer: Payer, lane: int, stream: bool) -> httpx.Response:
    body = json.dumps({"model": str(node.adapter_id), "messages": [{"role": "user", "content": "hi"}],
                       "max_tokens": 40, "temperature": 1.0, "stream": stream, "response_format": POISON}).encode()
    return httpx.post(f"{node.base_url}/v1/chat/completions", content=body, timeout=60,
                      headers={"X-Payment": payer.payment_header(body, lane), "Content-Type": "application/json"})


def _events(resp: httpx.Response) -> list[dict[str, Any]]:
    return [json.loads(line.removeprefix("data: ")) for line in resp.text.splitlines() if line.startswith("data: {")]


def test_a_poison_schema_ends_its_own_answer_charged_while_a_stream_beside_it_completes(node: PaidNode) -> None:
    honest = Attacker(Payer(node.payer_keys[0], node.base_url), node.base_url, str(node.adapter_id))
    attacker = Payer(node.payer_keys[1], node.base_url)
    body = honest.body(max_tokens=HONEST_TOKENS, stream=True)
    honest_before, attacker_before = honest.charged(1), int(attacker.channel(2)["chargedTotal"])
    got: list[dict[str, Any]] = []
    with httpx.stream("POST", f"{node.base_url}/v1/completions", content=body, timeout=120,
                      headers={"X-Payment": honest.header(body, 1), "Content-Type": "application/json"}) as resp:
        lines = resp.iter_lines()
        for line in lines:  # the honest answer is under way
            if line.startswith("data: {"):
                got.append(json.loads(line.removeprefix("data: ")))
                break
        poisoned = [_poison(node, attacker, 2, stream=True) for _ in range(3)]
        got += [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: {")]
    assert not [e for e in got if "error" in e], [e for e in got if "error" in e]
    assert got[-1]["usage"]["completion_tokens"] == HONEST_TOKENS and got[-1]["choices"][0]["finish_reason"] == "length"
    assert honest.charged_once_settled(1, honest_before) == int(got[-1]["receipt"]["chargedTotal"]) > honest_before
    fees = 0
    for resp in poisoned:  # each ended at its dead end, alone, and paid for what it generated
        events = _events(resp)
        assert resp.status_code == 200 and not [e for e in events if "error" in e], resp.text
        last = events[-1]
        assert last["choices"][0]["finish_reason"] == "length" and last["usage"]["completion_tokens"] >= 1
        fees += int(last["receipt"]["fee"])
    assert int(attacker.channel(2)["chargedTotal"]) == attacker_before + fees


def test_a_plain_poison_request_is_answered_and_charged_like_a_cut_answer(node: PaidNode) -> None:
    attacker = Payer(node.payer_keys[1], node.base_url)
    before = int(attacker.channel(3)["chargedTotal"])
    resp = _poison(node, attacker, 3, stream=False)
    assert resp.status_code == 200, resp.text
    answer = resp.json()
    assert answer["choices"][0]["finish_reason"] == "length" and answer["choices"][0]["message"]["content"] == '"'
    assert int(attacker.channel(3)["chargedTotal"]) == before + int(answer["receipt"]["fee"])
    served = _poison(node, attacker, 3, stream=False)  # and again: the node is no worse for it
    assert served.status_code == 200 and served.json()["choices"][0]["finish_reason"] == "length"
