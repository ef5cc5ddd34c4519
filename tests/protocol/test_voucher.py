"""The voucher's one home: its header, stored JSON, row and ABI forms are the same voucher."""

from __future__ import annotations

import base64
import json
from types import SimpleNamespace

from hypothesis import given
from hypothesis import strategies as st

from node.protocol.address import checksum_address
from node.protocol.eip712 import Domain
from node.protocol.voucher import (
    MAX_DEADLINE,
    SignedVoucher,
    Voucher,
    decode_payment_header,
    recover_voucher_signer,
    sign_voucher,
)

KEY = "0x4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318"
PAYER = "0x2c7536E3605D9C16a7a3D7b1898e529396a65c23"  # KEY's address
DOMAIN = Domain(31337, "0x" + "99" * 20)
addresses = st.binary(min_size=20, max_size=20).map(lambda b: checksum_address("0x" + b.hex()))
vouchers = st.builds(SignedVoucher, payer=addresses, node=addresses, lane=st.integers(0, 2**32 - 1),
                     cumulative=st.integers(0, 2**256 - 1), request_hash=st.binary(min_size=32, max_size=32),
                     deadline=st.integers(0, MAX_DEADLINE), signature=st.binary(min_size=65, max_size=65))


@given(vouchers)
def test_every_form_reads_back_as_the_same_voucher(sv: SignedVoucher) -> None:
    header = sv.encode()
    assert decode_payment_header(header) == sv
    assert json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4))) == sv.to_json()
    assert SignedVoucher.from_json(json.loads(json.dumps(sv.to_json()))) == sv
    assert SignedVoucher.from_row(SimpleNamespace(**sv.columns())) == sv  # type: ignore[arg-type]
    assert sv.as_abi() == ((sv.payer, sv.node, sv.lane, sv.cumulative, sv.request_hash, sv.deadline), sv.signature)


def test_a_signed_voucher_recovers_to_its_payer_through_its_header() -> None:
    voucher = Voucher(PAYER, "0x" + "22" * 20, 3, 10**18, b"\x42" * 32, 1_767_225_600)
    sv = decode_payment_header(SignedVoucher.of(voucher, sign_voucher(KEY, voucher, DOMAIN)).encode())
    assert recover_voucher_signer(sv.voucher, DOMAIN, sv.signature) == PAYER
