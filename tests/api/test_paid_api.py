"""The paid API end to end: the official `openai` client against a live uvicorn server on loopback,
vouchers checked against an indexed mirror of real contracts on anvil, signed receipts back."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest

from node.chain.contracts import lineage_hash
from node.client.payer import Payer, verify_receipt
from node.protocol.voucher import PaymentHeader, decode_payment_header
from tests.fixtures.paid_node import LINEAGE_WEIGHTS, PaidNode

pytestmark = pytest.mark.chain


def _payer(node: PaidNode, i: int = 0, **kw: object) -> Payer:
    return Payer(node.payer_keys[i], node.base_url, **kw)  # type: ignore[arg-type]


def _charged(node: PaidNode, payer: Payer, lane: int) -> int:
    return int(payer.channel(lane)["chargedTotal"])


def test_completion_with_the_openai_client_returns_a_signed_receipt(paid_node: PaidNode) -> None:
    payer = _payer(paid_node)
    client = payer.openai(lane=0)
    before = _charged(paid_node, payer, 0)
    out = client.completions.create(model=str(paid_node.adapter_id), prompt="the sea is", max_tokens=8,
                                    temperature=0)
    assert out.choices[0].text and out.usage.completion_tokens >= 1
    receipt = out.model_extra["receipt"]
    assert verify_receipt(receipt, payer.info.domain) == payer.info.node
    assert receipt["lineageHash"] == "0x" + lineage_hash(paid_node.dataset_ids, LINEAGE_WEIGHTS).hex()
    assert receipt["adapterId"] == "0x" + paid_node.adapter_id.to_bytes(32, "big").hex()
    assert receipt["promptTokens"] == out.usage.prompt_tokens
    fee = 10**9 * out.usage.prompt_tokens + 2 * 10**9 * out.usage.completion_tokens
    assert int(receipt["fee"]) == fee
    assert int(receipt["chargedTotal"]) == before + fee == _charged(paid_node, payer, 0)
    fetched = httpx.get(f"{paid_node.base_url}/v1/receipts/{receipt['id']}").json()
    assert fetched["signature"] == receipt["signature"] and fetched["fee"] == receipt["fee"]


def test_chat_streaming_ends_with_usage_and_receipt(paid_node: PaidNode) -> None:
    payer = _payer(paid_node)
    client = payer.openai(lane=1)
    stream = client.chat.completions.create(model=str(paid_node.adapter_id), stream=True, max_tokens=10,
                                            messages=[{"role": "user", "content": "tell me of the sea"}])
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    last = chunks[-1]
    assert last.choices[0].finish_reason in ("stop", "length")
    receipt = last.model_extra["receipt"]
    assert verify_receipt(receipt, payer.info.domain) == payer.info.node
    assert last.usage is not None and receipt["completionTokens"] == last.usage.completion_tokens
    from eth_hash.auto import keccak

    assert receipt["outputHash"] == "0x" + keccak(text.encode()).hex()
    assert int(receipt["chargedTotal"]) == _charged(paid_node, payer, 1)


def test_the_same_voucher_sent_again_is_answered_once_and_charged_once(paid_node: PaidNode) -> None:
    payer = _payer(paid_node)
    body = json.dumps({"model": str(paid_node.adapter_id), "prompt": "calm", "max_tokens": 4}).encode()
    header = payer.payment_header(body, lane=2)
    send = lambda: httpx.post(f"{paid_node.base_url}/v1/completions", content=body,  # noqa: E731
                              headers={"X-Payment": header, "Content-Type": "application/json"})
    first, second = send(), send()
    assert first.status_code == second.status_code == 200
    assert first.json() == second.json()
    assert second.headers["X-Idempotent-Replay"] == "true"
    assert _charged(paid_node, payer, 2) == int(first.json()["receipt"]["fee"])


def _post(node: PaidNode, body: bytes, header: str | None) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    if header is not None:
        headers["X-Payment"] = header
    return httpx.post(f"{node.base_url}/v1/completions", content=body, headers=headers, timeout=60)


def _reheader(header: str, **changes: object) -> PaymentHeader:
    h = decode_payment_header(header)
    return PaymentHeader(**{**h.__dict__, **changes})  # type: ignore[arg-type]


def test_every_refusal_has_its_status_and_an_openai_error_body(paid_node: PaidNode) -> None:
    payer = _payer(paid_node)
    model = str(paid_node.adapter_id)
    body = json.dumps({"model": model, "prompt": "x", "max_tokens": 2}).encode()
    good = payer.payment_header(body, lane=3)
    cases = {
        "malformed body": (_post(paid_node, b"{not json", good), 400, "invalid_request"),
        "no header": (_post(paid_node, body, None), 402, "payment_required"),  # x402 PaymentRequired
        "body changed": (_post(paid_node, body.replace(b'"x"', b'"y"'), good), 401, "bad_signature"),
        "forged signature": (_post(paid_node, body, _reheader(good, signature=b"\x11" * 64 + b"\x1b").encode()),
                             401, "bad_signature"),
        "unknown adapter": (_post(paid_node, body.replace(model.encode(), b"999"),
                                  payer.payment_header(body.replace(model.encode(), b"999"), 3)), 404,
                            "adapter_not_found"),
        "n > 16": (_post(paid_node, json.dumps({"model": model, "prompt": "x", "n": 17}).encode(), good), 400,
                  "invalid_request"),
    }
    long_body = json.dumps({"model": model, "prompt": "sea " * 5000, "max_tokens": 2}).encode()
    cases["prompt too long"] = (_post(paid_node, long_body, payer.payment_header(long_body, 3)), 413,
                                "prompt_too_long")
    for name, (resp, status, code) in cases.items():
        assert resp.status_code == status, (name, resp.text)
        err = resp.json()["error"]
        assert err["code"] == code and err["message"], name


def test_stale_short_and_unfunded_vouchers(paid_node: PaidNode) -> None:
    payer = _payer(paid_node)
    body = json.dumps({"model": str(paid_node.adapter_id), "prompt": "sea", "max_tokens": 2}).encode()
    short = _resign(payer, _reheader(payer.payment_header(body, 6), cumulative=1))  # below the max fee
    resp = _post(paid_node, body, short)
    assert resp.status_code == 402 and "does not cover" in resp.json()["error"]["message"]
    assert _post(paid_node, body, payer.payment_header(body, 4)).status_code == 200
    last = int(payer.channel(4)["lastCumulative"])
    body2 = body.replace(b'"sea"', b'"the sea"')
    stale = _resign(payer, _reheader(payer.payment_header(body2, 4), cumulative=last - 1))
    resp = _post(paid_node, body2, stale)
    assert resp.status_code == 409 and "stale" in resp.json()["error"]["message"]
    poor = Payer(paid_node.poor_payer_key, paid_node.base_url)
    resp = _post(paid_node, body, poor.payment_header(body, 0))
    assert resp.status_code == 402 and resp.json()["error"]["code"] == "insufficient_escrow"


def _resign(payer: Payer, h: PaymentHeader) -> str:
    from node.protocol.voucher import Voucher, sign_voucher

    v = Voucher(h.payer, h.node, h.lane, h.cumulative, h.request_hash, h.deadline)
    return PaymentHeader(**{**h.__dict__, "signature": sign_voucher(payer.key, v, payer.info.domain)}).encode()


def _served_once_the_hold_is_released(node: PaidNode, payer: Payer, lane: int) -> httpx.Response:
    """A small paid request on `lane`, retried while the lane still answers 409 (the hold of a request
    whose client hung up is released once the server notices), for up to 10 s."""
    deadline = time.monotonic() + 10
    while True:
        again = json.dumps({"model": str(node.adapter_id), "prompt": "sea", "max_tokens": 2}).encode()
        resp = _post(node, again, payer.payment_header(again, lane))
        if resp.status_code != 409 or time.monotonic() >= deadline:
            return resp
        time.sleep(0.2)


def test_a_dropped_stream_is_charged_for_what_was_generated_and_frees_the_lane(paid_node: PaidNode) -> None:
    payer = _payer(paid_node)
    body = json.dumps({"model": str(paid_node.adapter_id), "prompt": "sea", "max_tokens": 400,
                       "stream": True, "stop": ["@@never@@"]}).encode()
    before = _charged(paid_node, payer, 5)
    with httpx.stream("POST", f"{paid_node.base_url}/v1/completions", content=body, timeout=60,
                      headers={"X-Payment": payer.payment_header(body, 5), "Content-Type": "application/json"}) as r:
        assert r.status_code == 200
        next(line for line in r.iter_lines() if line.startswith("data: {"))  # one chunk, then hang up
    resp = _served_once_the_hold_is_released(paid_node, payer, 5)
    assert resp.status_code == 200, resp.text
    dropped = _charged(paid_node, payer, 5) - before - int(resp.json()["receipt"]["fee"])
    assert 0 < dropped <= 10**9 * 2 + 2 * 10**9 * 400  # the chunks generated before the hang-up, no more


def test_a_plain_request_whose_client_hangs_up_is_charged_for_its_partial_answer_and_frees_the_lane(
        paid_node: PaidNode) -> None:
    payer = _payer(paid_node)
    body = json.dumps({"model": str(paid_node.adapter_id), "prompt": "the sea", "max_tokens": 1000,
                       "temperature": 0, "stop": ["@@never@@"]}).encode()
    before = _charged(paid_node, payer, 6)
    with pytest.raises(httpx.ReadTimeout):  # the client gives up mid-generation and closes the connection
        httpx.post(f"{paid_node.base_url}/v1/completions", content=body, timeout=httpx.Timeout(10, read=0.3),
                   headers={"X-Payment": payer.payment_header(body, 6), "Content-Type": "application/json"})
    resp = _served_once_the_hold_is_released(paid_node, payer, 6)
    assert resp.status_code == 200, resp.text
    dropped = _charged(paid_node, payer, 6) - before - int(resp.json()["receipt"]["fee"])
    assert 0 <= dropped < 10**9 * 3 + 2 * 10**9 * 1000  # what it had generated when it left: never the whole


def test_concurrent_clients_on_many_lanes_pay_exactly_their_receipts(paid_node: PaidNode) -> None:
    payer = _payer(paid_node, 1)
    lanes, per_lane = range(10, 14), 3
    fees: dict[int, list[int]] = {lane: [] for lane in lanes}
    errors: list[BaseException] = []

    def work(lane: int) -> None:
        client = payer.openai(lane=lane, max_retries=5)
        try:
            for i in range(per_lane):
                out = client.completions.create(model=str(paid_node.adapter_id), prompt=f"sea {i}", max_tokens=6)
                fees[lane].append(int(out.model_extra["receipt"]["fee"]))
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(lane,)) for lane in lanes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for lane in lanes:
        assert len(fees[lane]) == per_lane
        assert _charged(paid_node, payer, lane) == sum(fees[lane])


def test_overload_is_429_with_retry_after(paid_node: PaidNode) -> None:
    payer = _payer(paid_node, 1)
    results: list[int] = []

    def one(lane: int) -> None:
        body = json.dumps({"model": str(paid_node.adapter_id), "prompt": "sea", "max_tokens": 200,
                           "stop": ["@@never@@"]}).encode()
        results.append(_post(paid_node, body, payer.payment_header(body, lane)).status_code)

    threads = [threading.Thread(target=one, args=(lane,)) for lane in range(40, 52)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert 429 in results and 200 in results, results


def test_models_quote_and_health(paid_node: PaidNode) -> None:
    with pytest.raises(openai.NotFoundError):
        _payer(paid_node).openai(lane=0).completions.create(model="12345", prompt="x", max_tokens=1)
    models = httpx.get(f"{paid_node.base_url}/v1/models").json()["data"]
    base = paid_node.local.settings.resolved_served_model_name()
    assert [m["id"] for m in models] == [base, str(paid_node.adapter_id)]
    assert [d["weightBps"] for d in models[1]["lineage"]["datasets"]] == list(LINEAGE_WEIGHTS)
    quote = httpx.get(f"{paid_node.base_url}/v1/quote", params={"prompt_tokens": 10, "max_tokens": 5}).json()
    assert int(quote["maxFee"]) == 10 * 10**9 + 5 * 2 * 10**9
    assert httpx.get(f"{paid_node.base_url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{paid_node.base_url}/ready").status_code == 200
    metrics = httpx.get(f"{paid_node.base_url}/metrics").text
    assert "loranode_receipts_total" in metrics and "loranode_adapter_tier" in metrics
    assert "loranode_engine_prefix_cache_hit_tokens_total" in metrics
    assert "loranode_engine_prefix_cache_evictions_total" in metrics


def test_database_and_mirror_outages_are_503_and_charge_nothing(paid_node: PaidNode) -> None:
    from node.db.session import make_engine, session_factory

    svc = paid_node.local.services
    assert svc is not None
    payer = _payer(paid_node)
    before = _charged(paid_node, payer, 60)
    body = json.dumps({"model": str(paid_node.adapter_id), "prompt": "sea", "max_tokens": 2}).encode()
    header = payer.payment_header(body, 60)
    dead = session_factory(make_engine("postgresql+psycopg://nobody@127.0.0.1:1/none?connect_timeout=1"))
    saved = (svc.payments.ledger.factory, svc.catalog.factory, svc.catalog.cache_ttl_s, svc.db)
    svc.payments.ledger.factory, svc.catalog.factory, svc.catalog.cache_ttl_s, svc.db = dead, dead, 0.0, dead
    try:
        resp = _post(paid_node, body, header)
        assert resp.status_code == 503 and resp.json()["error"]["code"] == "database_unavailable"
        assert resp.headers["Retry-After"] == "1"
        ready = httpx.get(f"{paid_node.base_url}/ready")
        assert ready.status_code == 503 and ready.json()["database"] is False
    finally:
        svc.payments.ledger.factory, svc.catalog.factory, svc.catalog.cache_ttl_s, svc.db = saved
    assert httpx.get(f"{paid_node.base_url}/ready").status_code == 200
    assert _post(paid_node, body, header).status_code == 200  # the same voucher works once the database is back
    assert _charged(paid_node, payer, 60) > before


def test_responses_past_the_idempotency_window_are_forgotten_and_their_vouchers_refused(
        paid_node: PaidNode) -> None:
    import asyncio
    import dataclasses

    from node.api.app import prune_responses

    svc = paid_node.local.services
    assert svc is not None
    payer = _payer(paid_node)
    body = json.dumps({"model": str(paid_node.adapter_id), "prompt": "old", "max_tokens": 2}).encode()
    header = payer.payment_header(body, 61)
    assert _post(paid_node, body, header).status_code == 200
    assert _post(paid_node, body, header).headers.get("X-Idempotent-Replay") == "true"
    time.sleep(0.01)
    expired = dataclasses.replace(svc, idempotency_window_s=0.0, prune_interval_s=3600.0)
    with pytest.raises(TimeoutError):  # one pass, then it sleeps until the next one
        asyncio.run(asyncio.wait_for(prune_responses(expired), timeout=2.0))
    resp = _post(paid_node, body, header)
    assert resp.status_code == 409 and "already used" in resp.json()["error"]["message"]


def test_a_stale_mirror_refuses_paid_work_even_for_a_cached_adapter(paid_node: PaidNode) -> None:
    svc = paid_node.local.services
    assert svc is not None
    payer = _payer(paid_node)

    def ask() -> httpx.Response:
        body = json.dumps({"model": str(paid_node.adapter_id), "prompt": "sea", "max_tokens": 2}).encode()
        return _post(paid_node, body, payer.payment_header(body, 61))

    first = ask()
    assert first.status_code == 200  # the adapter is now in the catalog's cache
    payer.observe(61, int(first.headers["X-Charged-Total"]))
    before = _charged(paid_node, payer, 61)
    saved = svc.catalog.max_mirror_lag_s, svc.catalog.cache_ttl_s
    svc.catalog.max_mirror_lag_s = 0.001  # the mirror has not moved for longer than that
    try:
        for cache_ttl_s in (saved[1], 0.0):  # served from the cache, then looked up
            svc.catalog.cache_ttl_s = cache_ttl_s
            resp = ask()
            assert resp.status_code == 503, resp.text
            assert resp.json()["error"]["code"] == "mirror_unavailable"
    finally:
        svc.catalog.max_mirror_lag_s, svc.catalog.cache_ttl_s = saved
    assert _charged(paid_node, payer, 61) == before
    assert ask().status_code == 200
