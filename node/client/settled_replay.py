"""A paid request's settled 409, followed: the SDK's HTTP clients get the answer the payer paid for
even once its voucher is in an epoch (node/client/payer.py)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import httpx

from node.chain.receipt_read import HEADER, sign_read
from node.errors import NodeError
from node.protocol.hexstr import to_hex
from node.protocol.receipt import SignedReceipt, receipt_digest
from node.protocol.voucher import decode_payment_header, voucher_digest

if TYPE_CHECKING:
    from node.client.payer import Payer


class SettledReplay(httpx.BaseTransport):
    """Sends paid requests through `inner`; a 409 that names the receipt of the voucher sent (it was
    served, and is in an epoch by now: the node no longer replays it to whoever sends it) is answered by
    sending the same request again with the payer's `X-Receipt-Read` of that receipt, which gets the
    stored answer in the shape it was bought in. A read opens a receipt's text wherever it is, so one is
    signed only for this voucher's receipt: the node's public copy of it must hash to the id named and
    name this voucher (`voucherHash`), which no receipt of another request or node does."""

    def __init__(self, payer: Payer, inner: httpx.BaseTransport) -> None:
        self.payer, self.inner = payer, inner

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        if response.status_code != 409 or "X-Payment" not in request.headers or HEADER in request.headers:
            return response
        response.read()
        receipt_id = _settled_receipt(response.content)
        if receipt_id is None or not self._is_receipt_of(receipt_id, request.headers["X-Payment"]):
            return response
        response.close()
        headers = {**request.headers, HEADER: sign_read(self.payer.key, self.payer.address, receipt_id,
                                                        self.payer.info.domain)}
        again = httpx.Request(request.method, request.url, headers=headers, content=request.content,
                              extensions=request.extensions)
        return self.inner.handle_request(again)

    def _is_receipt_of(self, receipt_id: str, payment: str) -> bool:
        """Whether the node's public receipt `receipt_id` is the receipt of the voucher in `payment`."""
        domain = self.payer.info.domain
        try:
            voucher = decode_payment_header(payment).voucher
            public = SignedReceipt.from_json(self.payer.public_receipt(receipt_id))
        except (NodeError, KeyError, TypeError, ValueError):
            return False
        return to_hex(receipt_digest(public.receipt, domain)) == receipt_id.lower() and \
            public.receipt.voucher_hash == voucher_digest(voucher, domain)

    def close(self) -> None:
        self.inner.close()


def _settled_receipt(body: bytes) -> str | None:
    """The receipt a 409 names (`details.receipt_id`): its voucher was served and is in an epoch."""
    try:
        details = json.loads(body)["error"]["details"]
        receipt_id = details["receipt_id"]
    except (ValueError, KeyError, TypeError):
        return None
    return receipt_id if isinstance(receipt_id, str) else None
