"""Schemas built to hurt: nested hundreds deep, patterns whose grammar explodes, schemas of 200 KB, and
one that passes every bound but still compiles slowly. Each is refused with a 400, its hold released
(nothing charged, the lane goes on), quickly, while other requests keep being served."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from node.api import engine_client
from node.api.engine_client import EngineClient
from node.client.payer import Payer
from node.engine import EngineConfig, LLMEngine
from node.engine.grammar import GrammarSpec
from node.errors import BadRequest
from tests.fixtures.paid_node import PaidNode


def _nested(levels: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


SCHEMA = "response_format.json_schema.schema"
BOMBS = {  # name -> (schema, the field the refusal names)
    "nested 300 deep": (_nested(300), "body"),  # past the JSON parser's own depth limit
    "nested 80 deep": (_nested(80), SCHEMA),  # compile time grows with the square of the depth
    "pattern repeat": ({"type": "string", "pattern": "[a-z]{1,100000}"}, SCHEMA),  # 3,000 alone takes 5 s
    "nested repeats": ({"type": "string", "pattern": "(([a-z]{1,40}){1,40}){1,40}"}, SCHEMA),
    "200 KB of anyOf": ({"anyOf": [{"type": "object", "properties": {
        f"k{j}": {"enum": [f"v{i}" for i in range(50)]} for j in range(20)}} for _ in range(30)]}, SCHEMA),
}


@pytest.mark.chain
def test_schema_bombs_are_refused_fast_without_a_charge_while_others_are_served(paid_node: PaidNode) -> None:
    payer = Payer(paid_node.payer_keys[1], paid_node.base_url)
    model, lane = str(paid_node.adapter_id), 20

    def post(payload: dict[str, Any], lane: int) -> httpx.Response:
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}], **payload}).encode()
        return httpx.post(f"{paid_node.base_url}/v1/chat/completions", content=body, timeout=60,
                          headers={"X-Payment": payer.payment_header(body, lane), "Content-Type": "application/json"})

    served: list[int] = []
    stop = threading.Event()

    def honest() -> None:  # another client on its own lane, all along
        while not stop.is_set():
            served.append(post({"max_tokens": 4}, lane + 1).status_code)

    before = int(payer.channel(lane)["chargedTotal"])
    thread = threading.Thread(target=honest)
    thread.start()
    try:
        for name, (schema, param) in BOMBS.items():
            started = time.monotonic()
            resp = post({"max_tokens": 50, "response_format": {
                "type": "json_schema", "json_schema": {"name": "bomb", "schema": schema}}}, lane)
            assert resp.status_code == 400, (name, resp.text)
            assert resp.json()["error"]["param"] == param, name
            assert time.monotonic() - started < 3.0, name
    finally:
        stop.set()
        thread.join()
    assert int(payer.channel(lane)["chargedTotal"]) == before  # every hold was released: nothing charged
    assert served and set(served) == {200}


@pytest.fixture(scope="module")
def client(tiny_model: Path) -> EngineClient:
    return EngineClient(LLMEngine(EngineConfig(model_path=tiny_model, max_num_seqs=4, max_model_len=256)), 8)


def test_a_schema_within_bounds_that_compiles_too_slowly_is_refused_and_the_loop_keeps_running(
        client: EngineClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_client, "GRAMMAR_COMPILE_TIMEOUT_S", 0.1)
    slow = GrammarSpec.json_schema({"type": "string", "pattern": "([a-z]{1,30}){1,30}"})  # 900: in bounds
    compile_now = client.engine.grammars.compile

    def compile_slowly(spec: GrammarSpec) -> object:  # however fast this machine compiles it
        time.sleep(0.5)
        return compile_now(spec)

    monkeypatch.setattr(client.engine.grammars, "compile", compile_slowly)

    async def attempt() -> tuple[BadRequest, int]:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.005)
                ticks += 1

        ticker = asyncio.ensure_future(tick())
        try:
            with pytest.raises(BadRequest) as refused:
                await client.compile_grammar(slow, "response_format.json_schema.schema")
        finally:
            ticker.cancel()
        return refused.value, ticks

    error, ticks = asyncio.run(attempt())
    assert "took more than" in error.message and error.facts["param"] == "response_format.json_schema.schema"
    assert ticks >= 3  # the event loop ran while the grammar compiled on its own thread
