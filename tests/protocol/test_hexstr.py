"""One hex helper for the node: 0x-hex out, 0x or bare hex in, and named refusals of anything else."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from node.errors import BadRequest
from node.protocol.hexstr import from_hex, normalize, parse_hash, to_hex


@given(st.binary(max_size=80))
def test_bytes_round_trip_through_every_spelling(raw: bytes) -> None:
    text = to_hex(raw)
    assert text == text.lower() and text.startswith("0x")
    assert from_hex(text) == from_hex(text[2:]) == from_hex("0X" + text[2:].upper()) == raw
    assert normalize(raw) == normalize(text.upper().replace("0X", "0x")) == normalize(text[2:]) == text


@pytest.mark.parametrize("text", ["0x123", "0xzz", "12 34", "0x0x12"])
def test_what_is_not_hex_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        from_hex(text)


@pytest.mark.parametrize("value", ["0x" + "ab" * 31, "0x" + "ab" * 33, None, 7, "0x" + "zz" * 32])
def test_a_hash_field_that_is_not_32_bytes_is_refused_by_name(value: object) -> None:
    with pytest.raises(BadRequest) as refused:
        parse_hash(value, "outputHash")
    assert refused.value.facts["field"] == "outputHash"
