"""The stateless half of accepting a voucher: who signed it, for which node, request and time.

No database, no chain: a few microseconds of hashing and one signature recovery.
"""

from __future__ import annotations

from dataclasses import dataclass

from node.errors import BadSignature
from node.payment.header import PaymentHeader, request_hash
from node.protocol.eip712 import Domain, Voucher, recover, voucher_digest


@dataclass(frozen=True)
class CheckedVoucher:
    voucher: Voucher
    signature: bytes
    digest: bytes  # the EIP-712 digest: the voucher's id and the receipt's voucherHash

    @property
    def digest_hex(self) -> str:
        return "0x" + self.digest.hex()


def check_voucher(header: PaymentHeader, body: bytes, *, domain: Domain, node: str) -> CheckedVoucher:
    """Raise BadSignature (401) unless the voucher is signed by its payer, for this node and this
    exact request body. (Its deadline is checked by the caller: a retry of a used voucher may be late.)"""
    if header.node.lower() != node.lower():
        raise BadSignature("the voucher is for another node", voucher_node=header.node, node=node)
    body_hash = request_hash(body)
    if header.request_hash != body_hash:
        raise BadSignature("requestHash is not keccak256 of the request body as sent",
                           request_hash="0x" + header.request_hash.hex(), body_hash="0x" + body_hash.hex())
    voucher = Voucher(payer=header.payer, node=header.node, lane=header.lane, cumulative=header.cumulative,
                      request_hash=header.request_hash, deadline=header.deadline)
    digest = voucher_digest(voucher, domain)
    signer = recover(digest, header.signature)
    if signer.lower() != header.payer.lower():
        raise BadSignature("the signature does not recover to the payer", payer=header.payer, signer=signer)
    return CheckedVoucher(voucher=voucher, signature=header.signature, digest=digest)
