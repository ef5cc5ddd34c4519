"""EIP-712 vouchers, receipts and receipt reads: the same digest as eth-account, and only canonical signatures."""

from __future__ import annotations

import pytest
from eth_account import Account
from eth_utils import to_checksum_address
from hypothesis import given, settings
from hypothesis import strategies as st

from node.errors import BadRequest, BadSignature
from node.protocol.address import checksum_address
from node.protocol.eip712 import (
    SECP256K1_N,
    Domain,
    ReceiptRead,
    receipt_read_digest,
    receipt_read_typed_data,
    recover_receipt_read_signer,
    sign_receipt_read,
)
from node.protocol.receipt import Receipt, receipt_digest, receipt_typed_data, recover_receipt_signer, sign_receipt
from node.protocol.voucher import Voucher, recover_voucher_signer, sign_voucher, voucher_digest, voucher_typed_data

KEY = "0x" + "ab" * 32
ADDRESS = Account.from_key(KEY).address
DOMAIN = Domain(chain_id=31337, verifying_contract="0x" + "5e" * 20)

hashes = st.binary(min_size=32, max_size=32)
vouchers = st.builds(Voucher, payer=st.just(ADDRESS), node=st.just("0x" + "90" * 20),
                     lane=st.integers(0, 2**32 - 1), cumulative=st.integers(0, 2**256 - 1),
                     request_hash=hashes, deadline=st.integers(0, 2**64 - 1))
receipts = st.builds(Receipt, voucher_hash=hashes,
                     adapter_id=st.integers(1, 2**64).map(lambda i: i.to_bytes(32, "big")),
                     registry_block=st.integers(0, 2**64 - 1), lineage_hash=hashes,
                     prompt_tokens=st.integers(0, 2**32 - 1), completion_tokens=st.integers(0, 2**32 - 1),
                     fee=st.integers(0, 2**256 - 1), output_hash=hashes, method=st.integers(0, 2**32 - 1))


@settings(max_examples=25, deadline=None)
@given(vouchers)
def test_voucher_digest_and_signature_match_eth_account(voucher: Voucher) -> None:
    signed = Account.sign_typed_data(KEY, full_message=voucher_typed_data(voucher, DOMAIN))
    assert voucher_digest(voucher, DOMAIN) == signed.message_hash
    assert sign_voucher(KEY, voucher, DOMAIN) == signed.signature
    assert recover_voucher_signer(voucher, DOMAIN, bytes(signed.signature)) == ADDRESS


@settings(max_examples=25, deadline=None)
@given(receipts)
def test_receipt_digest_and_signature_match_eth_account(receipt: Receipt) -> None:
    signed = Account.sign_typed_data(KEY, full_message=receipt_typed_data(receipt, DOMAIN))
    assert receipt_digest(receipt, DOMAIN) == signed.message_hash
    assert recover_receipt_signer(receipt, DOMAIN, sign_receipt(KEY, receipt, DOMAIN)) == ADDRESS


@settings(max_examples=25, deadline=None)
@given(hashes, st.integers(0, 2**64 - 1))
def test_receipt_read_digest_and_signature_match_eth_account(receipt_id: bytes, deadline: int) -> None:
    """The X-Receipt-Read a payer's wallet signs from `receipt_read_typed_data` is what the node checks."""
    read = ReceiptRead(receipt_id, ADDRESS, deadline)
    signed = Account.sign_typed_data(KEY, full_message=receipt_read_typed_data(read, DOMAIN))
    assert receipt_read_digest(read, DOMAIN) == signed.message_hash
    assert sign_receipt_read(KEY, read, DOMAIN) == signed.signature
    assert recover_receipt_read_signer(read, DOMAIN, bytes(signed.signature)) == ADDRESS


@settings(max_examples=25, deadline=None)
@given(st.integers(1, SECP256K1_N - 1), receipts, st.integers(1, 2**64), st.binary(min_size=20, max_size=20))
def test_any_key_signs_byte_for_byte_as_eth_account(key: int, receipt: Receipt, chain_id: int,
                                                     contract: bytes) -> None:
    """libsecp256k1 called directly gives eth-account's exact signature (RFC 6979, low s, v 27/28)."""
    hex_key, domain = "0x" + key.to_bytes(32, "big").hex(), Domain(chain_id, "0x" + contract.hex())
    signed = Account.sign_typed_data(hex_key, full_message=receipt_typed_data(receipt, domain))
    assert receipt_digest(receipt, domain) == signed.message_hash
    assert sign_receipt(hex_key, receipt, domain) == signed.signature
    assert recover_receipt_signer(receipt, domain, bytes(signed.signature)) == Account.from_key(hex_key).address


@given(st.binary(min_size=20, max_size=20))
def test_checksummed_addresses_are_eip55(raw: bytes) -> None:
    assert checksum_address("0x" + raw.hex().upper()) == to_checksum_address(raw)


def test_a_signature_with_no_curve_point_is_refused() -> None:
    voucher = Voucher(ADDRESS, "0x" + "90" * 20, 0, 100, b"\x01" * 32, 2**40)
    no_point = (5).to_bytes(32, "big") + (7).to_bytes(32, "big") + bytes([27])  # x = 5 is not on secp256k1
    with pytest.raises(BadSignature, match="does not recover"):
        recover_voucher_signer(voucher, DOMAIN, no_point)


def test_another_chain_or_contract_recovers_someone_else() -> None:
    voucher = Voucher(ADDRESS, "0x" + "90" * 20, 0, 100, b"\x01" * 32, 2**40)
    sig = sign_voucher(KEY, voucher, DOMAIN)
    for other in (Domain(1, DOMAIN.verifying_contract), Domain(31337, "0x" + "5f" * 20)):
        assert recover_voucher_signer(voucher, other, sig) != ADDRESS


def test_non_canonical_signatures_are_refused() -> None:
    voucher = Voucher(ADDRESS, "0x" + "90" * 20, 0, 100, b"\x01" * 32, 2**40)
    sig = sign_voucher(KEY, voucher, DOMAIN)
    r, s, v = sig[:32], int.from_bytes(sig[32:64], "big"), sig[64]
    malleable = r + (SECP256K1_N - s).to_bytes(32, "big") + bytes([55 - v])  # 27 <-> 28
    for bad in (malleable, sig[:64] + bytes([v - 27]), sig[:64], b"\0" * 65):
        with pytest.raises(BadSignature):
            recover_voucher_signer(voucher, DOMAIN, bad)


@pytest.mark.parametrize("field,value", [("payer", "0x1234"), ("lane", 2**32), ("cumulative", -1),
                                         ("request_hash", b"\x01" * 31), ("deadline", "soon")])
def test_a_malformed_voucher_is_a_bad_request(field: str, value: object) -> None:
    good = {"payer": ADDRESS, "node": "0x" + "90" * 20, "lane": 0, "cumulative": 1,
            "request_hash": b"\x01" * 32, "deadline": 1}
    with pytest.raises(BadRequest) as bad:
        Voucher(**{**good, field: value})  # type: ignore[arg-type]
    assert bad.value.facts["field"] in (field, "requestHash")
