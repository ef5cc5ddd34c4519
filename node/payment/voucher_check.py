"""The stateless half of accepting a voucher: who signed it, for which node, request and time.

No database, no chain: a few microseconds of hashing and one signature recovery.
"""

from __future__ import annotations

from dataclasses import dataclass

from node.errors import BadSignature
from node.protocol.eip712 import Domain, recover
from node.protocol.hexstr import to_hex
from node.protocol.voucher import SignedVoucher, request_hash, voucher_digest


@dataclass(frozen=True)
class CheckedVoucher(SignedVoucher):
    """A signed voucher whose signature recovers to its payer, for this node and request."""

    digest: bytes  # the EIP-712 digest: the voucher's id and the receipt's voucherHash

    @property
    def digest_hex(self) -> str:
        return to_hex(self.digest)


def check_voucher(header: SignedVoucher, body: bytes, *, domain: Domain, node: str) -> CheckedVoucher:
    """Raise BadSignature (401) unless the voucher is signed by its payer, for this node and this
    exact request body. (Its deadline is checked by the caller: a retry of a used voucher may be late.)"""
    if header.node.lower() != node.lower():
        raise BadSignature("the voucher is for another node", voucher_node=header.node, node=node)
    body_hash = request_hash(body)
    if header.request_hash != body_hash:
        raise BadSignature("requestHash is not keccak256 of the request body as sent",
                           request_hash=to_hex(header.request_hash), body_hash=to_hex(body_hash))
    digest = voucher_digest(header.voucher, domain)
    signer = recover(digest, header.signature)
    if signer.lower() != header.payer.lower():
        raise BadSignature("the signature does not recover to the payer", payer=header.payer, signer=signer)
    return CheckedVoucher(header.payer, header.node, header.lane, header.cumulative, header.request_hash,
                          header.deadline, header.signature, digest)
