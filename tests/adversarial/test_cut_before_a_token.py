"""A request the node's time limit cuts before its first token is charged nothing, streamed or not.

The time limit counts from the hold (node/api/generation.py): a request that waited in the engine's queue
past it (a busy node) ends with no token. A plain request so cut was released (503, nothing charged, the
voucher may be sent again), but a streamed one was charged: its choices ended "length" with no token, the
stream's end charged the prompt (and `min_fee`) for an answer of nothing, the voucher spent. The payer lost
money to the node's own slowness, for the same request that costs nothing unstreamed. Now the stream ends
with an error event, its hold released, the voucher good for a retry. Live node on anvil; the engine's
steps are made slow, so the cut lands before any token is generated."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from node.client.payer import Payer
from tests.adversarial.attacker import Attacker
from tests.fixtures.paid_node import PaidNode

pytestmark = pytest.mark.chain


@contextmanager
def busy_engine(paid: PaidNode, limit_s: float = 0.3, step_delay_s: float = 1.0) -> Iterator[None]:
    """The node's time limit set to `limit_s` and each engine step delayed by `step_delay_s`: a request
    is cut before the engine's first step takes it."""
    svc = paid.local.services
    assert svc is not None
    engine, generation = svc.engine.engine, svc.generation
    step, saved_limit = engine.step, generation.max_generation_s

    def slow_step() -> object:
        time.sleep(step_delay_s)
        return step()

    engine.step, generation.max_generation_s = slow_step, limit_s
    try:
        yield
    finally:
        engine.step, generation.max_generation_s = step, saved_limit
        del engine.step  # the class's own again
        time.sleep(step_delay_s)  # the slow step in progress ends


def _attacker(paid: PaidNode) -> Attacker:
    return Attacker(Payer(paid.payer_keys[1], paid.base_url), paid.base_url, str(paid.adapter_id))


def _body(att: Attacker, stream: bool, n: int = 1) -> bytes:
    return json.dumps({"model": att.model, "prompt": "the sea", "max_tokens": 20, "n": n, "stream": stream,
                       "temperature": 0}).encode()


def test_a_plain_request_cut_before_a_token_is_charged_nothing(paid_node: PaidNode) -> None:
    att, lane = _attacker(paid_node), 3_100
    body = _body(att, stream=False)
    header = att.header(body, lane)
    with busy_engine(paid_node):
        cut = att.post(body, header)
    assert cut.status_code == 503, cut.text
    assert att.charged(lane) == 0
    again = att.post(body, header)  # the same voucher buys the answer once the node is not busy
    assert again.status_code == 200 and int(again.json()["receipt"]["fee"]) == att.charged(lane) > 0


@pytest.mark.parametrize("n", [1, 3])
def test_a_stream_cut_before_a_token_is_charged_nothing_and_its_voucher_buys_the_answer(paid_node: PaidNode,
                                                                                        n: int) -> None:
    att, lane = _attacker(paid_node), 3_110 + n
    body = _body(att, stream=True, n=n)
    header = att.header(body, lane)
    with busy_engine(paid_node):
        status, text, events = att.stream_text(body, header)
    assert status == 200 and text == ""
    assert att.charged(lane) == 0, f"charged for an answer of nothing: {events[-1]}"
    assert "receipt" not in events[-1] and events[-1]["error"]["code"] == "unavailable", events[-1]
    status, text, events = att.stream_text(body, header)  # the same voucher, once the node is not busy
    assert status == 200 and text != "", events
    assert int(events[-1]["receipt"]["fee"]) == att.charged(lane) > 0
    assert events[-1]["receipt"]["completionTokens"] == 20 * n


@pytest.mark.parametrize("stream", [False, True])
def test_tokens_that_spell_no_text_cut_by_the_time_limit_are_charged(paid_node: PaidNode, stream: bool) -> None:
    """Tokens generated but spelling no text (a special token, which the detokenizer skips) are tokens all
    the same: a request the time limit cuts after them is charged them, streamed as unstreamed. The stream's
    end asked only whether text had left the node, so it released the hold (nothing charged, the voucher
    good again): one voucher bought the engine's time up to the limit, again and again, for nothing."""
    att, lane = _attacker(paid_node), 3_120 + int(stream)
    body = json.dumps({"model": att.model, "prompt": "the sea", "max_tokens": 500, "stream": stream,
                       "temperature": 0, "logit_bias": {"1": 100}}).encode()  # <s>: decoded to ""
    header = att.header(body, lane)
    with busy_engine(paid_node, limit_s=1.5, step_delay_s=0.1):
        if stream:
            status, text, events = att.stream_text(body, header)
            assert status == 200 and text == "", events
            receipt = events[-1].get("receipt")
            assert receipt is not None, f"tokens generated, nothing charged: {events[-1]}"
        else:
            response = att.post(body, header)
            assert response.status_code == 200, response.text
            receipt = response.json()["receipt"]
    assert 0 < receipt["completionTokens"] < 500
    assert int(receipt["fee"]) == att.charged(lane) > 0
