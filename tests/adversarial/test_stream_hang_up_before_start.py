"""A streamed request whose client hangs up before the response starts (while its payment is held and its
grammar compiles, or the hold is taken) must still end: its hold released (nothing was generated) and its
place among the requests in flight given back. Starlette cancels a stream whose client has gone before the
stream's generator first runs, and a generator that never ran never runs its `finally`: the hold stayed on
the lane until its TTL and the place in flight was never given back, so a few such hang-ups by one payer
left the node refusing everyone (429) for good. Live node on each database; the compile is slowed."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import pytest

from node.client.payer import Payer
from node.engine.grammar import GrammarSpec
from tests.fixtures.paid_node import PaidNode

pytestmark = pytest.mark.chain
COMPILE_S = 1.0


@pytest.fixture(scope="module")
def paid_node(paid_node_each_backend: PaidNode) -> PaidNode:
    return paid_node_each_backend


@pytest.fixture
def slow_compile(paid_node: PaidNode) -> Iterator[None]:
    svc = paid_node.local.services
    assert svc is not None
    grammars = svc.engine.engine.grammars
    real = grammars._compile

    def compile_slowly(spec: GrammarSpec) -> object:
        time.sleep(COMPILE_S)
        return real(spec)

    grammars._compile = compile_slowly  # type: ignore[method-assign]
    try:
        yield
    finally:
        del grammars._compile


def _chat(paid: PaidNode, tag: str, stream: bool = True) -> bytes:
    schema = {"type": "object", "properties": {"city": {"enum": ["Oslo", "Lima"]}}, "required": ["city"],
              "title": tag}  # a distinct schema each time: never a cached compile
    return json.dumps({"model": str(paid.adapter_id), "messages": [{"role": "user", "content": "a trip"}],
                       "max_tokens": 8, "stream": stream,
                       "response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": schema}}
                       }).encode()


def _send(paid: PaidNode, payer: Payer, body: bytes, lane: int, read_s: float = 60) -> httpx.Response | None:
    """The response, or None when the client gave up (closed the connection) after `read_s` without one."""
    header = payer.payment_header(body, lane, "/v1/chat/completions")
    try:
        return httpx.post(f"{paid.base_url}/v1/chat/completions", content=body,
                          timeout=httpx.Timeout(10, read=read_s),
                          headers={"X-Payment": header, "Content-Type": "application/json"})
    except httpx.ReadTimeout:
        return None


def test_streams_hung_up_during_their_compile_release_their_hold_and_their_place(paid_node: PaidNode,
                                                                                  slow_compile: None) -> None:
    payer = Payer(paid_node.payer_keys[1], paid_node.base_url)
    svc = paid_node.local.services
    assert svc is not None
    lanes = range(190, 190 + svc.engine.max_in_flight + 1)
    for lane in lanes:  # more hang-ups than the node has places in flight
        assert _send(paid_node, payer, _chat(paid_node, f"h{lane}"), lane, read_s=0.3) is None
    for lane in (lanes[0], lanes[-1]):  # once every compile is over (they queue for 2 threads)
        deadline = time.monotonic() + 15
        while (resp := _send(paid_node, payer, _chat(paid_node, f"p{lane}", stream=False), lane)) is not None \
                and resp.status_code in (409, 429) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert resp is not None and resp.status_code == 200, resp.text if resp is not None else "no answer"
        assert int(resp.json()["receipt"]["fee"]) == int(payer.channel(lane)["chargedTotal"]), \
            "a hang-up before anything was generated was charged"
