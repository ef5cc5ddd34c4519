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
from collections.abc import Iterator
from datetime import timedelta

import httpx
import pytest
from eth_account import Account

from node.client.payer import Payer
from node.db.loss import losses
from node.engine.grammar import MAX_PATTERN_REPEAT, GrammarSpec
from tests.fixtures.paid_node import PaidNode

pytestmark = pytest.mark.chain
NUM_PATTERNS = 120  # each pattern within MAX_PATTERN_REPEAT; together more than 5 s of compiling on the tiny model
HOLD_S, COMPILE_S = 6.0, 4.0  # a short hold, and a compile just under the API's limit of 5 s


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


@pytest.fixture
def short_hold_slow_compile(paid_node: PaidNode) -> Iterator[float]:
    """A node whose holds last HOLD_S (a short `reservation_ttl_s`), whose engine steps take 50 ms (an answer
    of 200 tokens outlasts the hold) and whose grammar compiles take COMPILE_S, just under the API's compile
    limit (a schema that is slow to compile). Yields the hold's life in seconds."""
    svc = paid_node.local.services
    assert svc is not None
    ledger, engine = svc.payments.ledger, svc.engine.engine
    saved = ledger.ttl, ledger.max_hold, svc.generation.max_generation_s
    ledger.ttl, ledger.max_hold = timedelta(seconds=HOLD_S + 0.5), timedelta(seconds=HOLD_S)
    svc.generation.max_generation_s = svc.payments.max_generation_s
    real_compile, real_step = engine.grammars._compile, engine.step

    def compile_slowly(spec: GrammarSpec) -> object:
        time.sleep(COMPILE_S)
        return real_compile(spec)

    def step() -> object:
        time.sleep(0.05)
        return real_step()

    engine.grammars._compile, engine.step = compile_slowly, step  # type: ignore[method-assign]
    try:
        yield HOLD_S
    finally:
        del engine.grammars._compile, engine.step
        ledger.ttl, ledger.max_hold, svc.generation.max_generation_s = saved


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_a_slow_compile_and_a_long_answer_never_outlive_the_hold(paid_node: PaidNode, short_hold_slow_compile: float,
                                                                stream: bool) -> None:
    """The compile runs once the hold stands; the answer's time limit was counted from the compile's end, so
    a compile of nearly 5 s and an answer run to the limit outlived a short hold: the charge was refused (an
    answer for free, a recorded loss). The limit is counted from the hold now: the answer is cut in time."""
    svc = paid_node.local.services
    assert svc is not None
    payer, lane = Payer(paid_node.payer_keys[0], paid_node.base_url), 40 + stream
    a = svc.engine.engine.tokenizer.convert_tokens_to_ids("a")
    schema = {"type": "object", "properties": {"p": {"type": "string"}}, "required": ["p"], "title": f"s{stream}"}
    body = json.dumps({"model": str(paid_node.adapter_id), "messages": [{"role": "user", "content": "a trip"}],
                       "max_tokens": 200, "stream": stream, "logit_bias": {str(a): 100}, "temperature": 0,
                       "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": schema}}
                       }).encode()
    before = int(payer.channel(lane)["chargedTotal"])
    started = time.monotonic()
    resp = _post(paid_node, payer, body, lane)
    assert resp.status_code == 200, resp.text
    last = [json.loads(line.removeprefix("data: ")) for line in resp.text.splitlines()
            if line.startswith("data: {")][-1] if stream else resp.json()
    assert "error" not in last, f"the charge came after the hold ({time.monotonic() - started:.1f} s): {last}"
    assert last["choices"][0]["finish_reason"] == "length" and last["receipt"]["completionTokens"] < 200
    assert int(payer.channel(lane)["chargedTotal"]) - before == int(last["receipt"]["fee"]) > 0
    with svc.db() as session:
        assert not [x for x in losses(session, svc.payments.node, payer.address) if x.lane == lane]
