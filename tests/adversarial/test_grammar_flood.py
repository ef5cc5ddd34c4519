"""Nobody makes the node compile grammars for free. A chat request's `response_format` or `tools` is
compiled on a small shared pool, and a compile, once started, runs to its end even after its request
gave up. A caller with no escrow (a fresh key signs a valid voucher for nothing) sent schemas of many
patterns, each within the per-pattern bound, that took seconds to compile, and was refused only after
them (402): two such requests kept the pool busy, and a paying user's structured request meanwhile was
refused (400, its grammar "took more than 5 s to compile"). Now a grammar is compiled only for a
request whose payment holds, and a whole schema's patterns share one repetition bound. Live node, on
SQLite and on PostgreSQL (when configured): the hold is taken, and released, around the compile."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from eth_account import Account

from node.client.payer import Payer
from node.engine.grammar import MAX_PATTERN_REPEAT
from tests.fixtures.paid_node import PaidNode

pytestmark = pytest.mark.chain
NUM_PATTERNS = 120  # each pattern within MAX_PATTERN_REPEAT; together more than 5 s of compiling on the tiny model


@pytest.fixture(scope="module")
def paid_node(paid_node_each_backend: PaidNode) -> PaidNode:
    """Each database's lanes: a hold placed before the compile, released when the compile refuses."""
    return paid_node_each_backend


def _heavy(tag: int) -> dict[str, object]:
    repeat = f"{{1,{MAX_PATTERN_REPEAT - tag}}}"  # a distinct schema per request: never a cached compile
    props = {f"p{i}": {"type": "string", "pattern": f"[a-z]{repeat}"} for i in range(NUM_PATTERNS)}
    return {"type": "object", "properties": props, "required": list(props)}


def _chat(paid: PaidNode, schema: dict[str, object], name: str) -> bytes:
    return json.dumps({"model": str(paid.adapter_id), "messages": [{"role": "user", "content": "a trip"}],
                       "max_tokens": 8, "response_format": {"type": "json_schema",
                                                            "json_schema": {"name": name, "schema": schema}}}).encode()


def _post(paid: PaidNode, payer: Payer, body: bytes, lane: int) -> httpx.Response:
    header = payer.payment_header(body, lane, "/v1/chat/completions")
    return httpx.post(f"{paid.base_url}/v1/chat/completions", content=body, timeout=60,
                      headers={"X-Payment": header, "Content-Type": "application/json"})


def test_a_caller_without_escrow_cannot_keep_the_grammar_compiler_from_paying_users(paid_node: PaidNode) -> None:
    stranger = Payer(Account.create().key.hex(), paid_node.base_url)  # signs valid vouchers, has no escrow
    refusals: list[tuple[int, float]] = []

    def attack(tag: int) -> None:
        started = time.monotonic()
        resp = _post(paid_node, stranger, _chat(paid_node, _heavy(tag), f"heavy{tag}"), 0)
        refusals.append((resp.status_code, time.monotonic() - started))

    attackers = [threading.Thread(target=attack, args=(tag,)) for tag in (1, 2)]
    for thread in attackers:
        thread.start()
    time.sleep(0.5)  # their schemas are with the node
    city = {"type": "object", "properties": {"city": {"enum": ["Oslo", "Lima"]}}, "required": ["city"]}
    paid = _post(paid_node, Payer(paid_node.payer_keys[0], paid_node.base_url), _chat(paid_node, city, "city"), 31)
    for thread in attackers:
        thread.join(60)
    assert paid.status_code == 200, paid.text
    assert [status for status, _ in refusals] == [402, 402], refusals
    assert all(seconds < 2.0 for _, seconds in refusals), f"the node compiled for a caller who cannot pay: {refusals}"


def test_a_schema_whose_patterns_together_repeat_too_much_is_refused_by_name(paid_node: PaidNode) -> None:
    resp = _post(paid_node, Payer(paid_node.payer_keys[0], paid_node.base_url), _chat(paid_node, _heavy(3), "h"), 32)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == "response_format.json_schema.schema" and "pattern" in error["message"], error
    city = {"type": "object", "properties": {"city": {"enum": ["Oslo", "Lima"]}}, "required": ["city"]}
    after = _post(paid_node, Payer(paid_node.payer_keys[0], paid_node.base_url), _chat(paid_node, city, "city"), 32)
    assert after.status_code == 200, f"the refused compile left its hold on the lane: {after.text}"
