"""A streamed answer with tools holds its text back (tool calls go out whole, in the last chunk): until
then nothing of it has left the node. A node fault in that time is one before any token left: nothing
is charged, no loss is recorded, and the client's voucher may be sent again; a client that hangs up in
that time is still charged for what was generated (and its voucher replays the stored answer), as a
plain request left mid-answer is. Live node on anvil."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from node.client.payer import Payer
from node.db.loss import losses
from tests.adversarial.attacker import NodeAborts
from tests.fixtures.paid_node import PaidNode

pytestmark = pytest.mark.chain
LONG_CALL = [{"type": "function", "function": {"name": "write", "parameters": {
    "type": "object", "properties": {"text": {"type": "string", "minLength": 1_500}}, "required": ["text"],
    "additionalProperties": False}}}]  # a call the tiny model takes seconds to write
GENERATING_S = 1.0  # into the answer, well before it ends (the whole call takes ~5 s on a quiet box)


def _body(node: PaidNode) -> bytes:
    return json.dumps({"model": str(node.adapter_id), "messages": [{"role": "user", "content": "the sea"}],
                       "tools": LONG_CALL, "tool_choice": "required", "max_completion_tokens": 1_500,
                       "stream": True, "temperature": 0}).encode()


def _stream(node: PaidNode, body: bytes, header: str, *, fault: bool = False, hang_up: bool = False) -> list[str]:
    """The stream's events; after the first (the role), the node faults, or the client hangs up."""
    events = []
    with httpx.stream("POST", f"{node.base_url}/v1/chat/completions", content=body, timeout=60,
                      headers={"X-Payment": header, "Content-Type": "application/json"}) as resp:
        assert resp.status_code == 200, resp.read()
        lines = resp.iter_lines()
        for line in lines:
            if not line.startswith("data: {"):
                continue
            events.append(line)
            if len(events) == 1 and (fault or hang_up):
                time.sleep(GENERATING_S)
                if hang_up:
                    break
                with NodeAborts(node):
                    events.extend(x for x in lines if x.startswith("data: {"))
                break
    return events


def _charged(payer: Payer, lane: int) -> int:
    return int(payer.channel(lane)["chargedTotal"])


def test_a_node_fault_before_the_tool_calls_left_charges_nothing_and_the_voucher_may_retry(
        paid_node: PaidNode) -> None:
    payer, lane = Payer(paid_node.payer_keys[1], paid_node.base_url), 150
    body = _body(paid_node)
    header = payer.payment_header(body, lane, "/v1/chat/completions")
    before = _charged(payer, lane)
    events = _stream(paid_node, body, header, fault=True)
    assert '"error"' in events[-1] and all('"tool_calls"' not in e for e in events)  # nothing of the answer left
    assert _charged(payer, lane) == before
    svc = paid_node.local.services
    assert svc is not None
    with svc.db() as session:
        assert not [x for x in losses(session, svc.payments.node, payer.address) if x.lane == lane]
    served = _stream(paid_node, body, header)  # the same voucher, sent again: served and charged once
    receipt = json.loads(served[-1].removeprefix("data: "))["receipt"]
    assert _charged(payer, lane) == before + int(receipt["fee"])


def test_a_client_that_hangs_up_before_the_tool_calls_left_pays_for_what_was_generated(
        paid_node: PaidNode) -> None:
    payer, lane = Payer(paid_node.payer_keys[1], paid_node.base_url), 151
    body = _body(paid_node)
    header = payer.payment_header(body, lane, "/v1/chat/completions")
    before = _charged(payer, lane)
    _stream(paid_node, body, header, hang_up=True)
    deadline = time.monotonic() + 10
    while _charged(payer, lane) == before and time.monotonic() < deadline:
        time.sleep(0.1)
    after = _charged(payer, lane)
    assert after > before, "a hang-up mid tool call was generated for free"
    replay = _stream(paid_node, body, header)  # its voucher replays the stored (cut) answer, free
    receipt = json.loads(replay[-1].removeprefix("data: "))["receipt"]
    assert int(receipt["fee"]) == after - before and _charged(payer, lane) == after
