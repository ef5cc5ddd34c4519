"""Hostile vouchers and bodies against the live paid node: each is refused with its typed error and
status, and nothing is charged: no receipt is written and no lane's charged total moves, the
attacker's or the victim's. Values come from hypothesis; the codec's own properties are in
test_voucher_properties.py."""

from __future__ import annotations

import base64
import itertools
import json
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import httpx
import pytest
from eth_account import Account
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from node.api.routes.inference import MAX_BODY_BYTES
from node.db.models import Lane, Receipt
from node.protocol.eip712 import SECP256K1_N, Domain
from node.protocol.voucher import UINT256_MAX, Voucher, request_hash, sign_voucher
from tests.fixtures.paid_node import PaidNode

pytestmark = pytest.mark.chain
_lanes = itertools.count(200_000)
FUZZ = settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))


@pytest.fixture
def nothing_charged(paid_node: PaidNode) -> Iterator[None]:
    """Receipts and the sum of every lane's charged total are the same after the test as before."""
    before = _ledger_totals(paid_node)
    yield
    assert _ledger_totals(paid_node) == before


def _ledger_totals(node: PaidNode) -> tuple[int, int]:
    svc = node.local.services
    assert svc is not None
    with svc.db() as session:
        return (session.scalar(select(func.count()).select_from(Receipt)) or 0,
                int(session.scalar(select(func.coalesce(func.sum(Lane.charged_total), 0))) or 0))


def _domain(node: PaidNode) -> Domain:
    d = httpx.get(f"{node.base_url}/v1/node").json()["domain"]
    return Domain(chain_id=d["chainId"], verifying_contract=d["verifyingContract"], name=d["name"],
                  version=d["version"])


def _body(node: PaidNode) -> bytes:
    return json.dumps({"model": str(node.adapter_id), "prompt": "the sea", "max_tokens": 2}).encode()


def _voucher(node: PaidNode, key: str, body: bytes, **over: Any) -> Voucher:
    fields = {"payer": Account.from_key(key).address, "node": node.local.contracts(0).client.address,
              "lane": next(_lanes), "cumulative": 10**18, "request_hash": request_hash(body),
              "deadline": 2_000_000_000}
    return Voucher(**{**fields, **over})


def _wire(v: Voucher, signature: bytes, **fields: Any) -> str:
    wire = {"payer": v.payer, "node": v.node, "lane": v.lane, "cumulative": str(v.cumulative),
            "requestHash": "0x" + v.request_hash.hex(), "deadline": v.deadline, "signature": "0x" + signature.hex()}
    return base64.urlsafe_b64encode(json.dumps({**wire, **fields}).encode()).rstrip(b"=").decode()


def _post(node: PaidNode, body: bytes, header: str | None, **headers: str) -> httpx.Response:
    sent = {"Content-Type": "application/json", **headers, **({"X-Payment": header} if header else {})}
    return httpx.post(f"{node.base_url}/v1/completions", content=body, headers=sent, timeout=60)


def _refused(resp: httpx.Response, status: int, code: str) -> None:
    assert resp.status_code == status, resp.text[:300]
    assert resp.json()["error"]["code"] == code


@FUZZ
@given(which=st.sampled_from(("chain_id", "verifying_contract", "name", "version")),
       chain_id=st.integers(0, UINT256_MAX), contract=st.binary(min_size=20, max_size=20),
       text=st.text(max_size=12))
def test_vouchers_signed_for_another_domain_are_401(paid_node: PaidNode, nothing_charged: None, which: str,
                                                    chain_id: int, contract: bytes, text: str) -> None:
    domain = _domain(paid_node)
    value = {"chain_id": chain_id, "verifying_contract": "0x" + contract.hex(), "name": text, "version": text}[which]
    other = replace(domain, **{which: value})
    assume(other.separator() != domain.separator())
    body = _body(paid_node)
    v = _voucher(paid_node, paid_node.payer_keys[0], body)
    _refused(_post(paid_node, body, _wire(v, sign_voucher(paid_node.payer_keys[0], v, other))), 401, "bad_signature")


@FUZZ
@given(form=st.sampled_from(("high-s", "v=0/1", "other v", "short", "long")), v_byte=st.integers(0, 255),
       cut=st.integers(1, 64))
def test_malleable_and_misshapen_signatures_are_refused(paid_node: PaidNode, nothing_charged: None, form: str,
                                                        v_byte: int, cut: int) -> None:
    body, key = _body(paid_node), paid_node.payer_keys[0]
    v = _voucher(paid_node, key, body)
    sig = sign_voucher(key, v, _domain(paid_node))
    s = int.from_bytes(sig[32:64], "big")
    bad = {"high-s": sig[:32] + (SECP256K1_N - s).to_bytes(32, "big") + bytes([55 - sig[64]]),
           "v=0/1": sig[:64] + bytes([sig[64] - 27]), "other v": sig[:64] + bytes([v_byte]),
           "short": sig[:-cut], "long": sig + sig[:cut]}[form]
    assume(bad != sig)
    expected = (400, "invalid_request") if form in ("short", "long") else (401, "bad_signature")
    _refused(_post(paid_node, body, _wire(v, bad)), *expected)


@FUZZ
@given(field=st.sampled_from(("cumulative", "lane", "deadline")), value=st.one_of(
    st.integers(UINT256_MAX + 1, 2**300).map(str), st.integers(max_value=-1), st.integers(2**64, 2**80),
    st.text(max_size=20), st.floats(allow_nan=False), st.booleans(), st.none()))
def test_out_of_range_and_non_decimal_numbers_are_400(paid_node: PaidNode, nothing_charged: None, field: str,
                                                     value: object) -> None:
    if field == "cumulative":
        assume(not (isinstance(value, str) and value.isascii() and value.isdigit()
                    and int(value) <= UINT256_MAX and str(int(value)) == value))
    body, key = _body(paid_node), paid_node.payer_keys[0]
    v = _voucher(paid_node, key, body)
    resp = _post(paid_node, body, _wire(v, sign_voucher(key, v, _domain(paid_node)), **{field: value}))
    _refused(resp, 400, "invalid_request")
    assert field in resp.json()["error"]["message"]


@FUZZ
@given(seconds_left=st.integers(-10**6, 29))
def test_expired_or_nearly_expired_vouchers_are_401(paid_node: PaidNode, nothing_charged: None,
                                                    seconds_left: int) -> None:
    import time

    body, key = _body(paid_node), paid_node.payer_keys[0]
    v = _voucher(paid_node, key, body, deadline=max(int(time.time()) + seconds_left, 0))
    resp = _post(paid_node, body, _wire(v, sign_voucher(key, v, _domain(paid_node))))
    _refused(resp, 401, "voucher_expires_too_soon")  # its own code: the signature is good


@FUZZ
@given(cumulative=st.integers(0, UINT256_MAX))
def test_another_payers_signature_never_charges_either_of_them(paid_node: PaidNode, nothing_charged: None,
                                                                cumulative: int) -> None:
    attacker, victim = paid_node.payer_keys
    body = _body(paid_node)
    v = _voucher(paid_node, victim, body, cumulative=cumulative)  # the victim pays, the attacker signs
    _refused(_post(paid_node, body, _wire(v, sign_voucher(attacker, v, _domain(paid_node)))), 401, "bad_signature")


@FUZZ
@given(prompt=st.text(min_size=1, max_size=200), extra=st.text(max_size=40))
def test_unicode_bodies_are_served_or_refused_never_a_5xx(paid_node: PaidNode, prompt: str, extra: str) -> None:
    key = paid_node.payer_keys[1]
    body = json.dumps({"model": str(paid_node.adapter_id), "prompt": prompt, "max_tokens": 2, extra: extra},
                      ensure_ascii=False).encode()
    v = _voucher(paid_node, key, body, cumulative=10**16)
    resp = _post(paid_node, body, _wire(v, sign_voucher(key, v, _domain(paid_node))))
    assert resp.status_code in (200, 400), resp.text[:300]
    charged = int(httpx.get(f"{paid_node.base_url}/v1/channels/{v.payer}/{v.lane}").json()["chargedTotal"])
    assert charged == (int(resp.json()["receipt"]["fee"]) if resp.status_code == 200 else 0)


def test_bodies_over_the_limit_are_413_with_or_without_a_length(paid_node: PaidNode, nothing_charged: None) -> None:
    key = paid_node.payer_keys[0]
    huge = json.dumps({"model": str(paid_node.adapter_id), "prompt": "é" * MAX_BODY_BYTES}).encode()
    v = _voucher(paid_node, key, huge)
    header = _wire(v, sign_voucher(key, v, _domain(paid_node)))
    _refused(_post(paid_node, huge, header), 413, "request_too_large")

    def chunks() -> Iterator[bytes]:  # no Content-Length: the server must stop reading at the limit itself
        for i in range(0, len(huge), 1 << 16):
            yield huge[i:i + (1 << 16)]

    resp = httpx.post(f"{paid_node.base_url}/v1/completions", content=chunks(), timeout=60,
                      headers={"Content-Type": "application/json", "X-Payment": header})
    _refused(resp, 413, "request_too_large")


def test_huge_and_unicode_headers_are_refused_as_bad_requests(paid_node: PaidNode, nothing_charged: None) -> None:
    body = _body(paid_node)
    _refused(_post(paid_node, body, "A" * 5000), 400, "invalid_request")  # over the voucher's 4 KiB
    _refused(_post(paid_node, body, base64.urlsafe_b64encode("ünïcødé ☃".encode()).decode()), 400, "invalid_request")
    try:  # over the HTTP server's own header limit: uvicorn answers 4xx or drops the connection
        resp = httpx.post(f"{paid_node.base_url}/v1/completions", content=body, timeout=60,
                          headers={"X-Payment": "x" * 200_000})
        assert 400 <= resp.status_code < 500
    except (httpx.ReadError, httpx.RemoteProtocolError):
        pass
    assert httpx.get(f"{paid_node.base_url}/health").status_code == 200
