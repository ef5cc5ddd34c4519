from __future__ import annotations

import base64
import contextlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from node.errors import BadRequest
from node.protocol.voucher import PaymentHeader, decode_payment_header, request_hash

PAYER = "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"
NODE = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"


def _header(**over: object) -> PaymentHeader:
    fields = dict(payer=PAYER, node=NODE, lane=3, cumulative=10**18, request_hash=request_hash(b"{}"),
                  deadline=1_800_000_000, signature=b"\x01" * 65)
    fields.update(over)
    return PaymentHeader(**fields)  # type: ignore[arg-type]


def _encode(obj: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


def test_round_trip_and_wire_shape() -> None:
    h = _header()
    encoded = h.encode()
    assert "=" not in encoded
    assert decode_payment_header(encoded) == h
    wire = json.loads(base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)))
    assert wire["cumulative"] == str(10**18) and wire["lane"] == 3
    assert wire["requestHash"] == "0x" + request_hash(b"{}").hex()


def test_request_hash_is_keccak_of_the_exact_bytes() -> None:
    assert request_hash(b"") .hex() == "c5d2460186f7233c927e7db2dcc703c0e500b653ca82273b7bfad8045d85a470"
    assert request_hash(b'{"a":1}') != request_hash(b'{"a": 1}')


@pytest.mark.parametrize("value, match", [
    (None, "missing X-Payment"),
    ("!!!", "not base64url JSON"),
    (_encode([1, 2]), "must be an object"),
    (_encode({"payer": PAYER}), "missing node"),
])
def test_malformed_headers_are_named(value: str | None, match: str) -> None:
    with pytest.raises(BadRequest, match=match):
        decode_payment_header(value)


@pytest.mark.parametrize("field, bad", [
    ("lane", -1), ("lane", 2**32), ("lane", True), ("cumulative", 5), ("cumulative", "01"),
    ("cumulative", str(2**256)), ("deadline", 2**64), ("deadline", 2**63), ("signature", "0x" + "00" * 64),
    ("payer", "0x1234"), ("requestHash", "0x" + "zz" * 32),
])
def test_each_bad_field_is_refused(field: str, bad: object) -> None:
    wire = json.loads(base64.urlsafe_b64decode(_header().encode() + "=="))
    wire[field] = bad
    with pytest.raises(BadRequest) as err:
        decode_payment_header(_encode(wire))
    assert field in err.value.facts["fields"]


@given(st.text(max_size=300))
def test_arbitrary_text_never_crashes(value: str) -> None:
    with contextlib.suppress(BadRequest):
        decode_payment_header(value)


def test_a_field_named_twice_is_refused_whichever_comes_first() -> None:
    """A reader that takes the first of two (not Python's: the last) would see another voucher than the one
    the node checked and stored: a header naming a field twice is refused, by name."""
    compact = base64.urlsafe_b64decode(_header().encode() + "==").decode()
    twice = compact[:-1] + ',"cumulative":"1"}'
    value = base64.urlsafe_b64encode(twice.encode()).decode().rstrip("=")
    with pytest.raises(BadRequest, match="not base64url JSON") as err:
        decode_payment_header(value)
    assert "'cumulative' is named twice" in err.value.facts["reason"]
