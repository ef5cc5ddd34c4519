"""Schemathesis against the live paid node's OpenAPI schema: every operation, with valid and invalid
data (schemathesis' positive and negative modes), as generated and with a real voucher signed for the
exact bytes sent (so the paid paths are reached, and served). No answer is a 5xx, every answer has a
documented status, media type and shape, invalid data is refused, and a paid request is charged
exactly its receipt's fee when served and nothing when refused.

`LORANODE_FUZZ_EXAMPLES` sets the cases per operation (default 40; the report's run used more);
the cases are the same on every run unless `LORANODE_FUZZ_SEED` picks others.
"""

from __future__ import annotations

import itertools
import json
import os
from collections import Counter
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode, checks
from schemathesis.core import NOT_SET

from node.api.schemas import ChatCompletionRequest, CompletionRequest
from node.client.payer import Payer
from tests.fixtures.paid_node import PaidNode

pytestmark = pytest.mark.chain

PAID = ("POST /v1/completions", "POST /v1/chat/completions")
OPERATIONS = (*PAID, "GET /v1/node", "GET /v1/models", "GET /v1/models/{model}", "GET /v1/quote",
              "GET /v1/channels/{payer}/{lane}", "GET /v1/channels/{payer}/{lane}/receipts",
              "GET /v1/x402/channels/{channel_id}/receipts",
              "GET /v1/receipts/{receipt_id}", "GET /v1/receipts/{receipt_id}/proof",
              "GET /v1/epochs/{node}/{epoch_id}", "GET /v1/epochs/{node}", "GET /v1/epochs/{node}/{epoch_id}/summary",
              "GET /v1/earnings/{node}/{account}", "GET /v1/adapters", "GET /health", "GET /ready", "GET /metrics",
              "POST /v1/quote/completions", "POST /v1/quote/chat/completions",
              "GET /x402/supported", "POST /x402/verify", "POST /x402/settle", "GET /x402/refund")
CONSTRAINTS = ("tools", "tool_choice", "parallel_tool_calls", "response_format")
MAX_EXAMPLES = int(os.environ.get("LORANODE_FUZZ_EXAMPLES", "40"))
SEED = os.environ.get("LORANODE_FUZZ_SEED")  # unset: derandomized (the same cases every run)
CHECKS = [checks.not_a_server_error, checks.status_code_conformance, checks.content_type_conformance,
          checks.response_schema_conformance, checks.response_headers_conformance, checks.negative_data_rejection]
# How a paid case is sent: as generated (its own X-Payment, if any), signed for its bytes, or signed
# with `model` set to the served adapter, or to the base model alone, and a small token budget (served).
MODES = ("as generated", "signed", "served", "served base")
_lanes = itertools.count(100_000)  # a fresh lane per signed case: nothing is in flight or charged there


@pytest.fixture(scope="module")
def schema(paid_node: PaidNode) -> Any:
    return schemathesis.openapi.from_url(f"{paid_node.base_url}/openapi.json")


@pytest.fixture(scope="module")
def payer(paid_node: PaidNode) -> Payer:
    return Payer(paid_node.payer_keys[0], paid_node.base_url, timeout_s=120.0)


def test_every_operation_of_the_schema_is_fuzzed(schema: Any) -> None:
    assert sorted(r.ok().label for r in schema.get_all_operations()) == sorted(OPERATIONS)


@pytest.mark.parametrize("label", OPERATIONS)
def test_no_server_error_and_every_answer_as_documented(label: str, schema: Any, paid_node: PaidNode,
                                                         payer: Payer) -> None:
    operation = schema.find_operation_by_label(label)
    statuses: Counter[int] = Counter()
    modes = MODES if label in PAID else MODES[:1]

    cases = st.one_of(operation.as_strategy(), operation.as_strategy(GenerationMode.NEGATIVE))

    # derandomized: the same cases on every run, so that CI never fails on a draw that happened to send
    # no servable request (it did: 40 cases hold 2 or 3 positive "served" ones); LORANODE_FUZZ_SEED varies it
    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck),
              derandomize=SEED is None)
    @given(case=cases, mode=st.sampled_from(modes))
    def fuzz(case: Any, mode: str) -> None:
        if mode.startswith("served") and case.meta.generation.mode is GenerationMode.NEGATIVE:
            mode = "signed"  # setting a valid model would make the invalid case valid
        if mode == "as generated":
            try:
                response = case.call(base_url=paid_node.base_url, timeout=120)
            except requests.exceptions.InvalidHeader:
                statuses[0] += 1  # not sendable over HTTP at all (control bytes in a header)
                return
        else:
            with httpx.Client(base_url=paid_node.base_url, timeout=120.0) as http:
                response = _send_paid(http, case, mode, paid_node, payer)
        statuses[response.status_code] += 1
        case.validate_response(response, checks=CHECKS)

    (fuzz if SEED is None else seed(int(SEED))(fuzz))()
    print(f"{label}: {sum(statuses.values())} cases, statuses {dict(sorted(statuses.items()))}")
    if label in PAID:
        assert statuses[200] > 0, "the fuzzer never reached a served paid request"


def _send_paid(http: httpx.Client, case: Any, mode: str, node: PaidNode, payer: Payer) -> httpx.Response:
    body_obj = case.body
    if mode.startswith("served") and isinstance(body_obj, dict):
        model = node.local.settings.resolved_served_model_name() if mode == "served base" else str(node.adapter_id)
        body_obj = {**body_obj, "model": model}
        for field in ("max_tokens", "max_completion_tokens"):
            if isinstance(body_obj.get(field), (int, float)):
                body_obj[field] = min(int(body_obj[field]), 8)
        body_obj.setdefault("max_tokens", 8)
        for field in CONSTRAINTS:  # random schemas and tool choices are fuzzed in the other modes
            body_obj.pop(field, None)
        # fields this node does not know are refused by name: fuzzed in the other modes
        declared = (ChatCompletionRequest if case.path.endswith("chat/completions") else CompletionRequest).model_fields
        body_obj = {k: v for k, v in body_obj.items() if k in declared}
        bias = body_obj.get("logit_bias")
        if isinstance(bias, dict) and not all(k.isascii() and k.isdigit() and len(k) <= 9 for k in bias):
            body_obj.pop("logit_bias")
        messages = body_obj.get("messages")
        if isinstance(messages, list):  # tool turns need the calls they answer: fuzzed in the other modes
            plain = [m for m in messages if isinstance(m, dict) and m.get("role") in ("system", "developer", "user")]
            body_obj["messages"] = plain or [{"role": "user", "content": "the sea"}]
        prompt = body_obj.get("prompt")
        if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            body_obj["prompt"] = [abs(t) % 256 for t in prompt]  # token ids the tiny model's vocabulary has
    body = _wire_bytes(body_obj)
    lane = next(_lanes)
    headers = {"Content-Type": "application/json", "X-Payment": payer.payment_header(body, lane)}
    response = http.post(case.path, content=body, headers=headers)
    _assert_charged_exactly(response, payer, lane)
    return response


def _wire_bytes(body: Any) -> bytes:
    if body is NOT_SET:
        return b""
    return body if isinstance(body, bytes) else json.dumps(body).encode()


def _assert_charged_exactly(response: httpx.Response, payer: Payer, lane: int) -> None:
    """Served: the lane is charged the receipt's fee. Refused: nothing."""
    charged = int(payer.channel(lane)["chargedTotal"])
    if response.status_code != 200:
        assert charged == 0, (response.status_code, response.text[:300])
        return
    receipt = _receipt(response)
    assert charged == int(receipt["fee"]) == int(receipt["chargedTotal"])


def _receipt(response: httpx.Response) -> dict[str, Any]:
    if not response.headers["content-type"].startswith("text/event-stream"):
        return response.json()["receipt"]  # type: ignore[no-any-return]
    events = [line.removeprefix("data: ") for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]", events[-3:]
    return json.loads(events[-2])["receipt"]  # type: ignore[no-any-return]
