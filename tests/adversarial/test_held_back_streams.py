"""A stream holds back the end of its text that a stop string begins with (it may become the stop string,
which is never sent). A client that hung up while everything generated was held back had been sent
nothing, so its hold was released: the same voucher bought the generation again, and again (free
compute). The rule now (DESIGN: "a client that hangs up is charged for what was generated"): the engine
tells the API, delta by delta, the whole characters it holds back and their tokens; a hang-up charges
the tokens sent and those held back, and stores the text sent and the text held back as the answer, so
a replay of the voucher returns, free, exactly the text of every token charged. The payer is never
charged for a token whose text it cannot get (an unfinished character's tokens are neither charged nor
stored, as when an answer ends inside one), and never gets what was generated for free. Live node on
each database; the engine's steps are slowed so the hang-up lands while the text is held back."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import pytest

from node.client.payer import Payer
from node.db.loss import losses
from tests.adversarial.attacker import Attacker
from tests.fixtures.paid_node import PaidNode

pytestmark = pytest.mark.chain
STEP_S = 0.15  # each engine step at least this long: 20 tokens take 3 s, the client leaves after 1.2 s


@pytest.fixture(scope="module")
def paid_node(paid_node_each_backend: PaidNode) -> PaidNode:
    """Each database's lanes: a hang-up's charge and its stored answer."""
    return paid_node_each_backend


@pytest.fixture
def slow_engine(paid_node: PaidNode) -> Iterator[None]:
    """The engine's step loop, each step slowed to STEP_S (a busy node)."""
    svc = paid_node.local.services
    assert svc is not None
    engine = svc.engine.engine
    real = engine.step

    def step() -> object:
        time.sleep(STEP_S)
        return real()

    engine.step = step  # type: ignore[method-assign]
    try:
        yield
    finally:
        del engine.step


def _attacker(paid: PaidNode) -> Attacker:
    return Attacker(Payer(paid.payer_keys[1], paid.base_url), paid.base_url, str(paid.adapter_id))


def _all_a(paid: PaidNode, max_tokens: int, stop: str) -> bytes:
    """An answer of "a"s only (logit_bias), streamed, with a stop string it keeps looking like the start of."""
    svc = paid.local.services
    assert svc is not None
    a = svc.engine.engine.tokenizer.convert_tokens_to_ids("a")
    return json.dumps({"model": str(paid.adapter_id), "prompt": "the sea", "max_tokens": max_tokens, "stream": True,
                       "temperature": 0, "logit_bias": {str(a): 100}, "stop": [stop]}).encode()


def _leave_after(att: Attacker, body: bytes, header: str, seconds: float) -> list[str]:
    """Stream the answer and hang up when nothing came for `seconds`; the events read."""
    got: list[str] = []
    try:
        with httpx.stream("POST", f"{att.base_url}/v1/completions", content=body,
                          timeout=httpx.Timeout(10, read=seconds),
                          headers={"X-Payment": header, "Content-Type": "application/json"}) as resp:
            assert resp.status_code == 200, resp.read()
            got.extend(line for line in resp.iter_lines() if line.startswith("data: {"))
    except httpx.ReadTimeout:
        return got
    raise AssertionError(f"the whole answer came before the client could leave: {got[-1:]}")


def test_a_hang_up_while_all_text_is_held_back_is_charged_and_the_voucher_replays_it(
        paid_node: PaidNode, slow_engine: None) -> None:
    att, lane = _attacker(paid_node), 180
    body = _all_a(paid_node, max_tokens=20, stop="a" * 30 + "!")  # 20 "a"s: all of it a stop string's start
    header = att.header(body, lane)
    before = att.charged(lane)
    assert _leave_after(att, body, header, seconds=8 * STEP_S) == [], "text went out: nothing was held back"
    after = att.charged_once_settled(lane, before)
    assert after > before, "the generation held back from a client that hung up was not charged (free compute)"
    status, text, events = att.stream_text(body, header)  # the same voucher again
    assert status == 200 and events, text
    receipt = events[-1]["receipt"]
    assert att.charged(lane) == after, "the voucher bought a second generation"
    assert events[-1]["choices"][0]["finish_reason"] == "abort"
    assert 0 < receipt["completionTokens"] < 20 and text == "a" * receipt["completionTokens"], (text, receipt)
    fee = paid_node.local.services.payments.pricing.fee(receipt["promptTokens"], receipt["completionTokens"])  # type: ignore[union-attr]
    assert int(receipt["fee"]) == fee == after - before


def test_a_hang_up_while_the_text_of_n_choices_is_held_back_charges_each_choice_what_it_generated(
        paid_node: PaidNode, slow_engine: None) -> None:
    """n choices, logprobs asked: each choice's held text is stored and charged, under one receipt."""
    att, lane = _attacker(paid_node), 181
    body = json.loads(_all_a(paid_node, max_tokens=20, stop="a" * 30 + "!"))
    body = json.dumps({**body, "n": 2, "logprobs": 1}).encode()
    header = att.header(body, lane)
    before = att.charged(lane)
    assert _leave_after(att, body, header, seconds=8 * STEP_S) == [], "text went out: nothing was held back"
    after = att.charged_once_settled(lane, before)
    assert after > before, "the choices held back from a client that hung up were not charged"
    status, _, events = att.stream_text(body, header)  # the same voucher again: the stored answer
    assert status == 200 and att.charged(lane) == after
    texts, tokens = ["", ""], [[], []]  # type: ignore[var-annotated]
    for event in events:
        for choice in event.get("choices", []):
            texts[choice["index"]] += choice["text"] or ""
            tokens[choice["index"]] += (choice.get("logprobs") or {}).get("tokens", [])
    receipt = events[-1]["receipt"]
    assert all(text and set(text) == {"a"} for text in texts), texts
    assert [len(t) for t in tokens] == [len(text) for text in texts], "a token charged has no logprob"
    assert receipt["completionTokens"] == sum(map(len, texts)), (texts, receipt)
    fee = paid_node.local.services.payments.pricing.fee(receipt["promptTokens"], receipt["completionTokens"])  # type: ignore[union-attr]
    assert int(receipt["fee"]) == fee == after - before


def test_max_tokens_reached_while_all_text_is_held_back_sends_and_charges_all_of_it(paid_node: PaidNode) -> None:
    """The answer ends (its length) inside what looked like a stop string's start: that text was never the
    stop string, and goes out with the last chunk, every token charged once."""
    att, lane = _attacker(paid_node), 182
    body = _all_a(paid_node, max_tokens=12, stop="a" * 30 + "!")
    before = att.charged(lane)
    status, text, events = att.stream_text(body, att.header(body, lane))
    assert status == 200 and text == "a" * 12
    assert [e["choices"][0]["text"] for e in events if e.get("choices") and e["choices"][0]["text"]] == [text]
    receipt = events[-1]["receipt"]
    assert events[-1]["choices"][0]["finish_reason"] == "length" and receipt["completionTokens"] == 12
    assert att.charged(lane) - before == int(receipt["fee"])


@pytest.fixture
def slow_charge(paid_node: PaidNode) -> Iterator[None]:
    """The charge's commit takes a second (a busy database): the receipt chunk comes that much after the text."""
    svc = paid_node.local.services
    assert svc is not None
    real = svc.payments.finish

    def finish(*args: object, **kwargs: object) -> object:
        time.sleep(1.0)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    svc.payments.finish = finish  # type: ignore[method-assign]
    try:
        yield
    finally:
        del svc.payments.finish


def test_a_hang_up_after_the_last_token_before_the_receipt_chunk_is_charged_once_for_the_whole_answer(
        paid_node: PaidNode, slow_charge: None) -> None:
    """The last chunk is being charged when the client leaves: the hang-up's settling must neither charge
    a second time nor store a cut answer over the whole one, nor record a loss."""
    svc = paid_node.local.services
    assert svc is not None
    att, lane = _attacker(paid_node), 183
    body = att.body(max_tokens=8, stream=True)
    header = att.header(body, lane)
    before = att.charged(lane)
    read = _leave_after(att, body, header, seconds=0.5)
    assert read and not any("receipt" in line for line in read), read
    after = att.charged_once_settled(lane, before, timeout_s=5)
    status, text, events = att.stream_text(body, header)
    receipt = events[-1]["receipt"]
    assert status == 200 and receipt["completionTokens"] == 8 and events[-1]["choices"][0]["finish_reason"] == "length"
    assert int(receipt["fee"]) == after - before and att.charged(lane) == after
    assert text == "".join(json.loads(line.removeprefix("data: "))["choices"][0]["text"] for line in read)
    with svc.db() as session:
        assert not [x for x in losses(session, svc.payments.node, att.payer.address) if x.lane == lane]
