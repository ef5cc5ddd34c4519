"""n > 1 under attack: n choices are n answers and are paid as such. A payer cannot get n choices for the
price of one, a voucher that covers fewer than n x max_tokens is refused (402) before anything is
generated, and a client that leaves mid-answer pays for what every choice had generated, under one
receipt. Real anvil, contracts, API and HTTP clients."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import pytest
from eth_hash.auto import keccak

from node.client.payer import Payer
from node.protocol.receipt import output_text
from node.protocol.voucher import PaymentHeader, Voucher, decode_payment_header, sign_voucher
from tests.adversarial.attacker import NEVER, Attacker
from tests.fixtures.paid_node import PaidNode

pytestmark = pytest.mark.chain
PROMPT_PRICE, COMPLETION_PRICE = 10**9, 2 * 10**9


@pytest.fixture(scope="module")
def paid_node(paid_node_each_backend: PaidNode) -> PaidNode:
    """On SQLite and on PostgreSQL (when configured): n choices' holds, and a hang-up's charge committed
    from another thread, on each database's lanes."""
    return paid_node_each_backend


def _fee(prompt_tokens: int, completion_tokens: int) -> int:
    return PROMPT_PRICE * prompt_tokens + COMPLETION_PRICE * completion_tokens


def _attacker(node: PaidNode) -> Attacker:
    return Attacker(Payer(node.payer_keys[1], node.base_url), node.base_url, str(node.adapter_id))


def _body(att: Attacker, n: int, max_tokens: int | None = 6, stream: bool = False, **more: Any) -> bytes:
    body = {"model": att.model, "prompt": "the sea", "n": n, "temperature": 0, "stop": [NEVER], "stream": stream,
            **more}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return json.dumps(body).encode()


def _header_for(att: Attacker, body: bytes, lane: int, budget: int) -> str:
    """A voucher for `body` whose cumulative is the lane's charged total plus exactly `budget`."""
    h = decode_payment_header(att.header(body, lane))
    v = Voucher(h.payer, h.node, h.lane, att.charged(lane) + budget, h.request_hash, h.deadline)
    signature = sign_voucher(att.payer.key, v, att.payer.info.domain)
    return PaymentHeader(**{**h.__dict__, "cumulative": v.cumulative, "signature": signature}).encode()


def _completion_tokens_served(node: PaidNode) -> float:
    metrics = httpx.get(f"{node.base_url}/metrics").text
    found = re.findall(r'^loranode_tokens_total\{adapter="[^"]*",kind="completion"\} (\S+)$', metrics, re.M)
    return sum(float(value) for value in found)  # every adapter's series (none before the first answer)


def _prompt_tokens(att: Attacker) -> int:
    body = _body(att, 1, max_tokens=1)
    return int(att.post(body, att.header(body, 129)).json()["usage"]["prompt_tokens"])


def test_n_choices_are_charged_as_n_answers_under_one_receipt(paid_node: PaidNode) -> None:
    att, lane = _attacker(paid_node), 120
    before = att.charged(lane)
    resp = att.post(_body(att, 3), att.header(_body(att, 3), lane))
    assert resp.status_code == 200, resp.text
    out = resp.json()
    texts = [c["text"] for c in out["choices"]]
    assert [c["index"] for c in out["choices"]] == [0, 1, 2] and all(texts)
    receipt = out["receipt"]
    assert out["usage"]["completion_tokens"] == receipt["completionTokens"] == 3 * 6  # all three, counted
    assert int(receipt["fee"]) == _fee(receipt["promptTokens"], 18) == att.charged(lane) - before
    assert receipt["outputHash"] == "0x" + keccak(output_text(texts).encode()).hex()  # the receipt covers all


def test_a_voucher_covering_one_choice_does_not_buy_n(paid_node: PaidNode) -> None:
    att, lane = _attacker(paid_node), 121
    prompt_tokens = _prompt_tokens(att)
    body = _body(att, 3)
    served, before = _completion_tokens_served(paid_node), att.charged(lane)
    resp = att.post(body, _header_for(att, body, lane, _fee(prompt_tokens, 6)))  # one choice's max fee
    assert resp.status_code == 402 and "does not cover" in resp.json()["error"]["message"], resp.text
    assert att.charged(lane) == before and _completion_tokens_served(paid_node) == served  # nothing generated
    just = att.post(body, _header_for(att, body, lane, _fee(prompt_tokens, 3 * 6)))  # n x max_tokens: served
    assert just.status_code == 200, just.text
    assert att.charged(lane) - before == _fee(prompt_tokens, 18)


def test_the_default_max_tokens_is_held_once_per_choice(paid_node: PaidNode) -> None:
    att, lane = _attacker(paid_node), 122
    prompt_tokens = _prompt_tokens(att)
    body = _body(att, 2, max_tokens=None)  # the node's default (16 here) for each choice
    refused = att.post(body, _header_for(att, body, lane, _fee(prompt_tokens, 16 * 2) - 1))
    assert refused.status_code == 402, refused.text
    resp = att.post(body, _header_for(att, body, lane, _fee(prompt_tokens, 16 * 2)))
    assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 32


def test_too_many_choices_are_refused_before_any_hold(paid_node: PaidNode) -> None:
    att, lane = _attacker(paid_node), 123
    before = att.charged(lane)
    body = _body(att, 17)
    resp = att.post(body, att.header(body, lane))
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "n"
    assert att.charged(lane) == before


def _events(resp: httpx.Response, chunks: int | None = None) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    for line in resp.iter_lines():
        if line.startswith("data: {"):
            got.append(json.loads(line.removeprefix("data: ")))
        if chunks is not None and len(got) >= chunks:
            break
    return got


def test_a_stream_of_n_choices_hung_up_is_charged_for_every_choice_generated(paid_node: PaidNode) -> None:
    att, lane = _attacker(paid_node), 124
    body = _body(att, 3, max_tokens=400, stream=True)
    header = att.header(body, lane)
    before = att.charged(lane)
    with httpx.stream("POST", f"{att.base_url}/v1/completions", content=body, timeout=30,
                      headers={"X-Payment": header, "Content-Type": "application/json"}) as resp:
        assert resp.status_code == 200
        read = _events(resp, chunks=9)  # then hang up
    after = att.charged_once_settled(lane, before)
    seen = {c["index"] for e in read for c in e["choices"] if c["text"]}
    assert seen == {0, 1, 2}, "the three choices stream side by side"
    with httpx.stream("POST", f"{att.base_url}/v1/completions", content=body, timeout=30,
                      headers={"X-Payment": header, "Content-Type": "application/json"}) as replay:
        events = _events(replay)  # the stored partial answer, free
    receipt, usage = events[-1]["receipt"], events[-1]["usage"]
    assert {c["finish_reason"] for c in events[-1]["choices"]} == {"abort"}
    assert 9 <= receipt["completionTokens"] == usage["completion_tokens"] < 3 * 400
    assert int(receipt["fee"]) == after - before == _fee(receipt["promptTokens"], receipt["completionTokens"])
    assert att.charged(lane) == after


def test_a_plain_request_of_n_choices_left_mid_answer_pays_for_all_they_generated(paid_node: PaidNode) -> None:
    att, lane = _attacker(paid_node), 125
    body = _body(att, 2, max_tokens=1_000)
    header = att.header(body, lane)
    before = att.charged(lane)
    att.leave_after(body, header, seconds=0.5)
    after = att.charged_once_settled(lane, before)
    replay = att.post(body, header).json()
    tokens = replay["usage"]["completion_tokens"]
    assert [c["finish_reason"] for c in replay["choices"]] == ["abort", "abort"]
    assert 0 < tokens == replay["receipt"]["completionTokens"] < 2_000
    assert int(replay["receipt"]["fee"]) == after - before == _fee(replay["usage"]["prompt_tokens"], tokens)
