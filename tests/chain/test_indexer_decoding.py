"""The indexer's own ABI decoder agrees with eth_abi on every event's data."""

from __future__ import annotations

import random

import pytest
from eth_abi import encode

from node.chain.events import SPECS, decode_data, split_types
from node.errors import ChainError


def _value(rng: random.Random, typ: str) -> object:
    if typ.startswith("("):
        return tuple(_value(rng, t) for t in split_types(typ[1:-1]))
    if typ.endswith("[]"):
        return [_value(rng, typ[:-2]) for _ in range(rng.randrange(0, 5))]
    if typ == "address":
        return "0x" + rng.randbytes(20).hex()
    if typ == "bytes32":
        return rng.randbytes(32)
    if typ == "string":
        return "".join(rng.choice("aé/:ü0x漢") for _ in range(rng.randrange(0, 90)))
    return rng.randrange(0, 2 ** int(typ[4:]))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_decoding_matches_eth_abi(spec: object) -> None:
    rng = random.Random(7)
    types = [p.type for p in spec.params if not p.indexed]  # type: ignore[attr-defined]
    for _ in range(50):
        values = [_value(rng, t) for t in types]
        got = decode_data(types, encode(types, values))
        assert got == [_expected(v) for v in values]


def _expected(v: object) -> object:
    """A value as the decoder gives it: bytes as 0x-hex, lists as tuples, all the way down."""
    if isinstance(v, bytes):
        return "0x" + v.hex()
    if isinstance(v, list | tuple):
        return tuple(_expected(x) for x in v)
    return v


def test_truncated_data_is_a_chain_error_not_a_crash() -> None:
    from node.chain.events import BY_NAME, decode_log

    spec = BY_NAME["DatasetUpdated"]
    data = encode(["string", "address"], ["ipfs://x", "0x" + "11" * 20])
    log = {"topics": [spec.topic0, "0x" + "00" * 31 + "01"], "data": "0x" + data[:40].hex(),
           "blockNumber": "0x1", "blockHash": "0x" + "22" * 32, "transactionHash": "0x" + "33" * 32,
           "logIndex": "0x0", "address": "0x" + "44" * 20}
    with pytest.raises(ChainError, match="does not decode"):
        decode_log(log, 31337)


def test_a_length_past_the_data_is_refused() -> None:
    data = bytearray(encode(["string"], ["ipfs://x"]))
    data[63] = 200  # claims 200 bytes, has 32
    with pytest.raises(ValueError, match="past the data"):
        decode_data(["string"], bytes(data))


def test_a_string_is_stored_without_nul_and_with_bytes_that_are_not_utf8_replaced() -> None:
    """PostgreSQL text refuses NUL (tests/adversarial/test_registry_poison.py); one rule on both databases."""
    raw = b"ipfs://\x00a\xffb"
    data = encode(["bytes", "address"], [raw, "0x" + "11" * 20])  # a string's encoding, with any bytes
    assert decode_data(["string", "address"], data) == ["ipfs://\ufffda\ufffdb", "0x" + "11" * 20]
