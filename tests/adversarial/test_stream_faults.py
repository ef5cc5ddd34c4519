"""A fault of the node's own mid-stream (here: writing a token's logprobs raises, as a bug would) is a
node fault whatever the exception: nothing is charged, the tokens already sent are a recorded loss, and
the stream ends with an error event. It used to be settled as if the client had hung up: charged, for an
answer it never got whole. Live node on anvil; the bug is injected into the API's token lookup."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from node.client.payer import Payer
from node.db.loss import LossReason, losses
from tests.fixtures.paid_node import PaidNode

pytestmark = pytest.mark.chain


@pytest.fixture
def buggy_logprobs(paid_node: PaidNode) -> Iterator[None]:
    """The API's token lookup fails once, at its fifth call (a bug in the stream's own code)."""
    svc = paid_node.local.services
    assert svc is not None
    engine, calls = svc.generation.engine, [0]
    real = engine.token_text

    def token_text(token_id: int) -> str:
        calls[0] += 1
        if calls[0] == 5:
            raise RuntimeError("a bug")
        return real(token_id)

    engine.token_text = token_text  # type: ignore[method-assign]
    try:
        yield
    finally:
        del engine.token_text


def test_a_node_bug_mid_stream_charges_nothing_and_records_the_loss(paid_node: PaidNode,
                                                                   buggy_logprobs: None) -> None:
    payer, lane = Payer(paid_node.payer_keys[1], paid_node.base_url), 170
    body = json.dumps({"model": str(paid_node.adapter_id), "prompt": "the sea", "max_tokens": 40, "logprobs": 1,
                       "stream": True, "temperature": 0, "stop": ["@@never@@"]}).encode()
    header = payer.payment_header(body, lane, "/v1/completions")
    before = int(payer.channel(lane)["chargedTotal"])
    events: list[str] = []
    with httpx.stream("POST", f"{paid_node.base_url}/v1/completions", content=body, timeout=60,
                      headers={"X-Payment": header, "Content-Type": "application/json"}) as resp:
        try:
            events.extend(line for line in resp.iter_lines() if line.startswith("data: {"))
        except httpx.RemoteProtocolError:
            events.append("(the connection was dropped)")
    assert int(payer.channel(lane)["chargedTotal"]) == before, "charged for a stream the node broke"
    assert '"error"' in events[-1] and len(events) > 1, events[-2:]
    svc = paid_node.local.services
    assert svc is not None
    with svc.db() as session:
        reasons = [x.reason for x in losses(session, svc.payments.node, payer.address) if x.lane == lane]
    assert reasons == [LossReason.NODE_FAULT]
