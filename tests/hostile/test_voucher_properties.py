"""Hypothesis against the voucher codec and checks (no network): whatever a client sends in
`X-Payment`, the answer is a voucher signed by its payer for this node, request and domain, or a
typed error (BadRequest 400 for the form, BadSignature 401 for who signed what), never anything else.
The same inputs against the live API, with charged totals, are in test_paid_refusals.py."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from eth_account import Account
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from node.errors import BadRequest, BadSignature
from node.payment.voucher_check import check_voucher
from node.protocol.eip712 import SECP256K1_N, Domain
from node.protocol.voucher import (
    FIELDS,
    MAX_DEADLINE,
    UINT256_MAX,
    PaymentHeader,
    Voucher,
    decode_payment_header,
    request_hash,
    sign_voucher,
)

DOMAIN = Domain(chain_id=31337, verifying_contract="0x5FbDB2315678afecb367f032d93F642f64180aa3")
NODE = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"
BODY = b'{"model":"1","prompt":"the sea"}'

keys = st.integers(1, SECP256K1_N - 1).map(lambda k: "0x" + k.to_bytes(32, "big").hex())
addresses = st.binary(min_size=20, max_size=20).map(lambda b: Account.from_key(b"\x01" * 32).address
                                                     if b == b"" else "0x" + b.hex())
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
                           max_leaves=8)


def _voucher(key: str, lane: int = 0, cumulative: int = 10**18, deadline: int = 2_000_000_000,
             node: str = NODE, body: bytes = BODY) -> Voucher:
    return Voucher(payer=Account.from_key(key).address, node=node, lane=lane, cumulative=cumulative,
                   request_hash=request_hash(body), deadline=deadline)


def _header(v: Voucher, signature: bytes, **wire: Any) -> str:
    fields = {"payer": v.payer, "node": v.node, "lane": v.lane, "cumulative": str(v.cumulative),
              "requestHash": "0x" + v.request_hash.hex(), "deadline": v.deadline, "signature": "0x" + signature.hex()}
    fields.update(wire)
    return base64.urlsafe_b64encode(json.dumps(fields).encode()).rstrip(b"=").decode()


def _check(header: str) -> object:
    return check_voucher(decode_payment_header(header), BODY, domain=DOMAIN, node=NODE)


@settings(max_examples=60, deadline=None)
@given(key=keys, lane=st.integers(0, 2**32 - 1), cumulative=st.integers(0, UINT256_MAX),
       deadline=st.integers(0, MAX_DEADLINE))
def test_a_voucher_signed_by_its_payer_is_accepted_whatever_its_in_range_values(
        key: str, lane: int, cumulative: int, deadline: int) -> None:
    v = _voucher(key, lane, cumulative, deadline)
    checked = check_voucher(decode_payment_header(_header(v, sign_voucher(key, v, DOMAIN))), BODY,
                            domain=DOMAIN, node=NODE)
    assert checked.voucher == v


@settings(max_examples=60, deadline=None)
@given(key=keys, chain_id=st.integers(0, UINT256_MAX), contract=addresses, name=st.text(max_size=20),
       version=st.text(max_size=5), which=st.sampled_from(("chain_id", "verifying_contract", "name", "version")))
def test_a_voucher_signed_under_another_domain_is_refused(key: str, chain_id: int, contract: str, name: str,
                                                          version: str, which: str) -> None:
    other = Domain(**{**DOMAIN.__dict__, which: {"chain_id": chain_id, "verifying_contract": contract,
                                                  "name": name, "version": version}[which]})
    assume(other.separator() != DOMAIN.separator())
    v = _voucher(key)
    with pytest.raises(BadSignature, match="does not recover to the payer"):
        _check(_header(v, sign_voucher(key, v, other)))


@settings(max_examples=60, deadline=None)
@given(key=keys, v_byte=st.integers(0, 255), form=st.sampled_from(("high-s", "raw v", "wrong v")))
def test_malleable_and_non_canonical_signatures_are_refused(key: str, v_byte: int, form: str) -> None:
    v = _voucher(key)
    sig = sign_voucher(key, v, DOMAIN)
    r, s, recid = sig[:32], int.from_bytes(sig[32:64], "big"), sig[64] - 27
    if form == "high-s":  # the same signature's twin: (r, n - s) with the other parity; valid math, not canonical
        bad = r + (SECP256K1_N - s).to_bytes(32, "big") + bytes([28 - recid])
    elif form == "raw v":  # v as 0/1 instead of 27/28
        bad = sig[:64] + bytes([recid])
    else:
        assume(v_byte not in (27, 28))
        bad = sig[:64] + bytes([v_byte])
    with pytest.raises(BadSignature):
        _check(_header(v, bad))


@settings(max_examples=40, deadline=None)
@given(key=keys, length=st.integers(0, 200).filter(lambda n: n != 65))
def test_a_signature_of_the_wrong_length_is_a_bad_request(key: str, length: int) -> None:
    v = _voucher(key)
    sig = (sign_voucher(key, v, DOMAIN) * 4)[:length]
    with pytest.raises(BadRequest, match="signature"):
        _check(_header(v, sig))


@settings(max_examples=40, deadline=None)
@given(attacker=keys, victim=keys)
def test_another_payers_signature_never_pays(attacker: str, victim: str) -> None:
    assume(attacker != victim)
    stolen = _voucher(victim)  # the victim as payer, signed by the attacker (or the victim's voucher re-signed)
    with pytest.raises(BadSignature, match="does not recover to the payer"):
        _check(_header(stolen, sign_voucher(attacker, stolen, DOMAIN)))


@settings(max_examples=30, deadline=None)
@given(key=keys, node=addresses, body=st.binary(max_size=64))
def test_a_voucher_for_another_node_or_request_is_refused(key: str, node: str, body: bytes) -> None:
    assume(node.lower() != NODE.lower() and body != BODY)
    for v in (_voucher(key, node=node), _voucher(key, body=body)):
        with pytest.raises(BadSignature):
            _check(_header(v, sign_voucher(key, v, DOMAIN)))


# --- the form of each field ------------------------------------------------------------------------
decimal_lookalikes = st.one_of(
    st.integers(UINT256_MAX + 1, 2**300).map(str), st.integers(max_value=-1).map(str),
    st.integers(0, 10**20).map(lambda n: st.sampled_from((f"{n}\n", f" {n}", f"+{n}", f"0{n}", f"{n}.0", hex(n),
                                                            f"{n:_}", f"{n}e0"))).flatmap(lambda s: s),
    st.text(alphabet="0123456789٠١٢٣٤٥٦٧٨٩０１２３ \n\t-+._eE", min_size=1, max_size=30))


@settings(max_examples=200, deadline=None)
@given(cumulative=decimal_lookalikes | json_values)
def test_cumulative_is_a_canonical_uint256_decimal_string_or_a_bad_request(cumulative: object) -> None:
    header = _header(_voucher("0x" + "11" * 32), b"\x01" * 65, cumulative=cumulative)
    try:
        decoded = decode_payment_header(header)
    except BadRequest as e:
        assert e.status == 400
        return
    assert isinstance(cumulative, str) and str(decoded.cumulative) == cumulative  # canonical, and in range


@settings(max_examples=200, deadline=None)
@given(field=st.sampled_from(("lane", "deadline")), value=json_values | st.integers(-2**70, 2**70))
def test_lane_and_deadline_are_uint32_and_storable_integers_or_a_bad_request(field: str, value: object) -> None:
    """The lane is a uint32; the deadline a uint64 the database can store (a signed BIGINT: < 2^63)."""
    header = _header(_voucher("0x" + "11" * 32), b"\x01" * 65, **{field: value})
    bound = 2**32 if field == "lane" else MAX_DEADLINE + 1
    in_range = type(value) is int and 0 <= value < bound
    if in_range:
        assert getattr(decode_payment_header(header), field) == value
    else:
        with pytest.raises(BadRequest, match=field):
            decode_payment_header(header)


@settings(max_examples=200, deadline=None)
@given(raw=st.one_of(st.text(max_size=6000), st.binary(max_size=6000).map(
    lambda b: base64.urlsafe_b64encode(b).decode()), st.dictionaries(
    st.sampled_from((*FIELDS, "extra", "")), json_values).map(
    lambda d: base64.urlsafe_b64encode(json.dumps(d).encode()).decode())))
def test_any_header_text_is_a_voucher_or_a_bad_request(raw: str) -> None:
    try:
        assert isinstance(decode_payment_header(raw), PaymentHeader)
    except BadRequest as e:
        assert e.status == 400 and e.message
