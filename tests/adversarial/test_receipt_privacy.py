"""Attack 5 of issue #17: a stranger reads other payers' paid outputs.

Receipt ids are public (the receipts tree of every settled epoch holds them), so whatever
`GET /v1/receipts/{id}` gives without proof of who asks is public. A live method 2 node (anvil,
indexed mirror, the engine, evidence spans) answers a payer; then a stranger, the payer, and every
public endpoint are asked what they hand out. The read authorization is built here by hand with
eth-account's EIP-712 encoder and the documented header form, not with the node's own code."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from eth_account import Account
from eth_account.messages import encode_typed_data

from node.client.payer import Payer
from node.db.models import EpochState
from node.protocol.voucher import PaymentHeader, request_hash
from node.settlement.policy import EpochPolicy
from node.settlement.runtime import SettlementRuntime
from tests.attribution import test_paid_attribution
from tests.attribution.test_paid_attribution import AttributedNode

pytestmark = pytest.mark.chain
attributed = test_paid_attribution.attributed  # the live method 2 node (a module fixture of its own here)
SECRET_PROMPT = "the sea is"
STRANGER_KEY = "0x" + "5a" * 32


@dataclass(frozen=True)
class Paid:
    receipt: dict[str, Any]
    text: str
    body: bytes = b""  # the request's exact bytes, when the test sent them itself


def _pay(node: AttributedNode, lane: int, prompt: str = SECRET_PROMPT) -> Paid:
    client = Payer(node.paid.payer_keys[0], node.paid.base_url).openai(lane=lane)
    out = client.completions.create(model=str(node.copied_adapter), prompt=prompt, max_tokens=40, temperature=0)
    return Paid(out.model_extra["receipt"], out.choices[0].text)


def _read_header(node: AttributedNode, key: str, receipt_id: str, *, payer: str | None = None,
                 deadline: int | None = None) -> str:
    """The X-Receipt-Read header as docs/api.md describes it, signed with `key`."""
    info = httpx.get(f"{node.paid.base_url}/v1/node").json()
    payer = payer or Account.from_key(key).address
    deadline = deadline if deadline is not None else int(time.time()) + 60
    typed = {"types": {"EIP712Domain": [{"name": "name", "type": "string"}, {"name": "version", "type": "string"},
                                        {"name": "chainId", "type": "uint256"},
                                        {"name": "verifyingContract", "type": "address"}],
                       "ReceiptRead": [{"name": "receiptId", "type": "bytes32"}, {"name": "payer", "type": "address"},
                                       {"name": "deadline", "type": "uint64"}]},
             "primaryType": "ReceiptRead", "domain": info["domain"],
             "message": {"receiptId": receipt_id, "payer": payer, "deadline": deadline}}
    signed = Account.sign_message(encode_typed_data(full_message=typed), key)
    body = {"receiptId": receipt_id, "payer": payer, "deadline": deadline,
            "signature": "0x" + bytes(signed.signature).hex()}
    return base64.urlsafe_b64encode(json.dumps(body).encode()).rstrip(b"=").decode()


def _get_receipt(node: AttributedNode, receipt_id: str, header: str | None = None) -> httpx.Response:
    headers = {} if header is None else {"X-Receipt-Read": header}
    return httpx.get(f"{node.paid.base_url}/v1/receipts/{receipt_id}", headers=headers)


def _strings(resp: httpx.Response) -> str:
    """Every string a response carries, JSON unescaped (a body that is not JSON, as it is)."""
    try:
        data = resp.json()
    except ValueError:
        return resp.text

    def walk(v: Any) -> Iterator[str]:
        if isinstance(v, dict):
            for k, x in v.items():
                yield str(k)
                yield from walk(x)
        elif isinstance(v, list):
            for x in v:
                yield from walk(x)
        else:
            yield str(v)

    return "\n".join(walk(data))


def _assert_no_text(resp: httpx.Response, paid: Paid, prompt: str) -> None:
    body = _strings(resp)
    assert len(paid.text.strip()) >= 12 and len(prompt) >= 10  # long enough that a chance match is no match
    assert paid.text not in body and prompt not in body
    assert paid.text.strip()[:12] not in body


def test_a_stranger_gets_the_receipt_with_hashes_counts_and_weights_only(attributed: AttributedNode) -> None:
    paid = _pay(attributed, lane=20)
    resp = _get_receipt(attributed, paid.receipt["id"])
    assert resp.status_code == 200
    shown = resp.json()
    assert "output" not in shown
    assert shown["outputHash"] == paid.receipt["outputHash"] and shown["signature"] == paid.receipt["signature"]
    assert shown["completionTokens"] == paid.receipt["completionTokens"]
    assert shown["attribution"]["weightsBps"] == paid.receipt["attribution"]["weightsBps"]
    assert "evidence" not in shown["attribution"] and "outputTokens" not in shown["attribution"]
    _assert_no_text(resp, paid, SECRET_PROMPT)


def test_the_payer_reads_its_own_text_with_a_signed_read(attributed: AttributedNode) -> None:
    paid = _pay(attributed, lane=21)
    payer = Payer(attributed.paid.payer_keys[0], attributed.paid.base_url)
    shown = payer.receipt(paid.receipt["id"])
    assert shown["output"] == paid.text and shown["signature"] == paid.receipt["signature"]
    spans = [s for e in shown["attribution"]["evidence"] for s in e["spans"]]
    assert spans and all(s["text"] in paid.text for s in spans)
    by_hand = _get_receipt(attributed, paid.receipt["id"], _read_header(attributed, payer.key, paid.receipt["id"]))
    assert by_hand.status_code == 200 and by_hand.json()["output"] == paid.text


def test_a_read_signed_by_anyone_but_the_payer_is_refused(attributed: AttributedNode) -> None:
    paid = _pay(attributed, lane=22)
    rid = paid.receipt["id"]
    own_name = _get_receipt(attributed, rid, _read_header(attributed, STRANGER_KEY, rid))
    assert own_name.status_code == 403 and "payer" in own_name.json()["error"]["message"]
    payer = Account.from_key(attributed.paid.payer_keys[0]).address
    posing = _get_receipt(attributed, rid, _read_header(attributed, STRANGER_KEY, rid, payer=payer))
    assert posing.status_code == 401 and "does not recover" in posing.json()["error"]["message"]
    for resp in (own_name, posing):
        _assert_no_text(resp, paid, SECRET_PROMPT)


def test_expired_far_off_foreign_and_malformed_reads_are_refused(attributed: AttributedNode) -> None:
    paid = _pay(attributed, lane=23)
    rid, key, now = paid.receipt["id"], attributed.paid.payer_keys[0], int(time.time())
    other = _pay(attributed, lane=24).receipt["id"]
    cases = {
        "expired": _read_header(attributed, key, rid, deadline=now - 1),
        "too far": _read_header(attributed, key, rid, deadline=now + 7 * 86_400),
        "another receipt": _read_header(attributed, key, other),
        "not base64": "%%%",
        "not the fields": base64.urlsafe_b64encode(b'{"receiptId": 1}').decode(),
    }
    for name, header in cases.items():
        resp = _get_receipt(attributed, rid, header)
        assert resp.status_code == 401, (name, resp.text)
        assert resp.json()["error"]["message"], name
        _assert_no_text(resp, paid, SECRET_PROMPT)


@pytest.fixture(scope="module")
def settled(attributed: AttributedNode) -> Iterator[Paid]:
    """A paid answer to a distinctive prompt whose receipt is in a FINAL, published epoch."""
    body = json.dumps({"model": str(attributed.copied_adapter), "prompt": DISTINCT_PROMPT, "max_tokens": 40,
                       "temperature": 0}).encode()
    header = Payer(attributed.paid.payer_keys[0], attributed.paid.base_url).payment_header(body, lane=25)
    answer = _post(attributed, body, header).json()
    paid = Paid(answer["receipt"], answer["choices"][0]["text"], body)
    service = SettlementRuntime.from_settings(attributed.paid.local.settings, EpochPolicy(max_age_s=0)).service
    service.reconcile()
    epoch_id = service.close_epoch()
    assert epoch_id is not None and service.run_until_final(epoch_id, timeout_s=60) is EpochState.FINAL
    yield paid


DISTINCT_PROMPT = "zebra quartz lantern: the sea is"


def _post(node: AttributedNode, body: bytes, header: str, read: str | None = None) -> httpx.Response:
    headers = {"X-Payment": header, "Content-Type": "application/json"} | ({"X-Receipt-Read": read} if read else {})
    return httpx.post(f"{node.paid.base_url}/v1/completions", content=body, headers=headers, timeout=60)


PAID_GETS = ("/x402/refund",)
PAYER_GETS = ("/receipts",)  # a lane's or an x402 channel's receipts: its payer's signed read, else 401


def _public_urls(node: AttributedNode, paid: Paid) -> list[str]:
    """Every GET route of the node's OpenAPI document, with this payer's and this receipt's values."""
    base = node.paid.base_url
    info = httpx.get(f"{base}/v1/node").json()
    payer = Account.from_key(node.paid.payer_keys[0]).address
    values = {"receipt_id": paid.receipt["id"], "node": info["node"], "payer": payer, "lane": "25",
              "account": payer, "channel_id": "0x" + "ab" * 32}
    urls = []
    for path, ops in httpx.get(f"{base}/openapi.json").json()["paths"].items():
        if "get" not in ops:
            continue
        filled = path
        for name, value in values.items():
            filled = filled.replace("{" + name + "}", value)
        if "{epoch_id}" in filled:
            urls += [base + filled.replace("{epoch_id}", e) for e in ("latest", "1")]
            continue
        if "{model}" in filled:
            urls += [base + filled.replace("{model}", m) for m in (info["baseModelName"], str(node.copied_adapter))]
            continue
        assert "{" not in filled, f"a public route this test does not know how to fill: {path}"
        urls.append(base + filled + ("?prompt_tokens=8" if path == "/v1/quote" else ""))
    return urls


def test_no_public_endpoint_returns_a_paid_output_or_its_prompt(attributed: AttributedNode, settled: Paid) -> None:
    urls = _public_urls(attributed, settled)
    assert any("/epochs/" in u for u in urls) and any(u.endswith("/proof") for u in urls)
    for url in urls:
        resp = httpx.get(url)
        # the x402 refund is a GET that takes a payment: unpaid, its 402 (404 on a node without x402)
        expected = (402, 404) if url.endswith(PAID_GETS) else (401,) if url.endswith(PAYER_GETS) else (200,)
        assert resp.status_code in expected, (url, resp.text[:300])
        _assert_no_text(resp, settled, DISTINCT_PROMPT)
    epoch = httpx.get(f"{attributed.paid.base_url}/v1/epochs/{settled.receipt['node']}/latest").json()
    assert any(settled.receipt["outputHash"] in json.dumps(v) for v in epoch["receipts"]["values"])


def _header_from_the_chain(node: AttributedNode, paid: Paid) -> str:
    """What a stranger rebuilds from the published settle transaction: the voucher and signature whose
    requestHash is keccak256 of a body it guessed, as an X-Payment header."""
    epoch = httpx.get(f"{node.paid.base_url}/v1/epochs/{paid.receipt['node']}/latest").json()
    settlement = node.paid.local.contracts(0).settlement
    tx = settlement.client.w3.eth.get_transaction(epoch["txHash"])
    _, args = settlement.contract.decode_function_input(tx["input"])
    for signed in args["vouchers"]:
        v = signed["voucher"]
        if bytes(v["requestHash"]) == request_hash(paid.body):  # the guess is confirmed offline
            return PaymentHeader(v["payer"], v["node"], v["lane"], v["cumulative"], bytes(v["requestHash"]),
                                 v["deadline"], bytes(signed["signature"])).encode()
    raise AssertionError("the settled voucher is not in the settle transaction")


def test_a_voucher_published_on_chain_does_not_replay_its_answer(attributed: AttributedNode, settled: Paid) -> None:
    """The settle transaction publishes every voucher with its signature; with a guess of the request's
    bytes, a stranger could send the payer's own X-Payment again and get its stored answer."""
    replay = _post(attributed, settled.body, _header_from_the_chain(attributed, settled))
    assert replay.status_code == 409 and "X-Receipt-Read" in replay.json()["error"]["message"]
    _assert_no_text(replay, settled, DISTINCT_PROMPT)
    payer = Payer(attributed.paid.payer_keys[0], attributed.paid.base_url)
    assert payer.receipt(settled.receipt["id"])["output"] == settled.text


def test_a_published_voucher_replays_only_with_its_payers_read_of_that_receipt(attributed: AttributedNode,
                                                                               settled: Paid) -> None:
    """The payer whose answer was lost gets it by sending the voucher again with its X-Receipt-Read of
    the receipt the 409 names; a stranger's read, or the payer's read of another receipt, gets no text."""
    header, rid, key = _header_from_the_chain(attributed, settled), settled.receipt["id"], attributed.paid.payer_keys[0]
    other = _pay(attributed, lane=26).receipt["id"]
    for name, read, status in (("a stranger's", _read_header(attributed, STRANGER_KEY, rid), 403),
                               ("another receipt's", _read_header(attributed, key, other), 401)):
        resp = _post(attributed, settled.body, header, read)
        assert resp.status_code == status, (name, resp.text)
        _assert_no_text(resp, settled, DISTINCT_PROMPT)
    own = _post(attributed, settled.body, header, _read_header(attributed, key, rid))
    assert own.status_code == 200 and own.headers["X-Idempotent-Replay"] == "true"
    assert own.json()["choices"][0]["text"] == settled.text and own.json()["receipt"]["id"] == rid
