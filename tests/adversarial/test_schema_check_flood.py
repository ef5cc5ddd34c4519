"""A structured request's schema is checked off the event loop, and a schema too big to compile is refused
before it is checked.

Before any hold (so with a valid signature and no escrow; with x402 offered, with no payment at all), a
chat request's `response_format` schema (or its tools' parameters) was checked against the JSON Schema
metaschema on the event loop: jsonschema takes about 0.2 ms per subschema, so a 1 MiB body of one flat
schema (some 35,000 properties) held the loop for seconds, every request of the node waiting, before the
caller got its 402. A schema over the grammar's MAX_SCHEMA_CHARS, which would never be compiled, was still
checked whole. Now the check runs on the tokenizing threads, after a size check that refuses such a schema
by name. Live node on anvil; the test holds a schema's check where it runs and asks for a paid answer
meanwhile."""

from __future__ import annotations

import json
import threading
from typing import Any

import httpx
import pytest

from node.api import structured
from node.client.payer import Payer
from node.engine.grammar import MAX_SCHEMA_CHARS
from tests.fixtures.flood import signed_completions
from tests.fixtures.paid_node import PaidNode

pytestmark = pytest.mark.chain
SCHEMA = "response_format.json_schema.schema"


def _structured(paid_node: PaidNode, num_properties: int) -> bytes:
    schema = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(num_properties)}}
    return json.dumps({"model": str(paid_node.adapter_id), "max_tokens": 4,
                       "messages": [{"role": "user", "content": "the sea"}],
                       "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
                       }).encode()


def _post(paid_node: PaidNode, body: bytes, header: str, path: str, timeout: float = 60) -> httpx.Response:
    return httpx.post(f"{paid_node.base_url}/v1/{path}", content=body, timeout=timeout,
                      headers={"X-Payment": header, "Content-Type": "application/json"})


def test_a_paid_request_is_served_while_a_stranger_s_schema_is_checked(paid_node: PaidNode,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    checking, release = threading.Event(), threading.Event()
    check = structured._check_schema

    def held(schema: dict[str, Any], param: str) -> None:
        checking.set()
        release.wait(60)  # the stranger's check, held until the paid request is answered
        check(schema, param)

    poor = Payer(paid_node.poor_payer_key, paid_node.base_url)  # its escrow pays for no request
    stranger = _structured(paid_node, 100)
    body, header = signed_completions(paid_node, Payer(paid_node.payer_keys[0], paid_node.base_url), 730)[0]
    refused: list[httpx.Response] = []
    sent = threading.Thread(target=lambda: refused.append(
        _post(paid_node, stranger, poor.payment_header(stranger, 0), "chat/completions")))
    monkeypatch.setattr(structured, "_check_schema", held)
    try:
        sent.start()
        assert checking.wait(30), "the stranger's schema was never checked"
        try:
            paid = _post(paid_node, body, header, "completions", timeout=10)
        except httpx.TimeoutException:
            pytest.fail("a paid request waited for a stranger's schema check: it ran on the event loop")
    finally:
        release.set()
        sent.join(60)
    assert paid.status_code == 200, paid.text
    assert refused and refused[0].status_code == 402, refused  # checked, then its escrow pays for nothing


def test_a_schema_too_big_to_compile_is_refused_by_name_before_any_check(paid_node: PaidNode) -> None:
    poor = Payer(paid_node.poor_payer_key, paid_node.base_url)
    body = _structured(paid_node, 30_000)  # a body's worth: about 1 MiB of schema, seconds of checking
    assert len(body) > 10 * MAX_SCHEMA_CHARS
    resp = _post(paid_node, body, poor.payment_header(body, 1), "chat/completions")
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == SCHEMA and error["details"]["max_chars"] == MAX_SCHEMA_CHARS, error
