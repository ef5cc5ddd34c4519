"""`GET /x402/refund`: the cooperative refund of an x402 batch-settlement channel, as the `x402` SDKs ask
for it (`scheme.refund(url)`): without a payment the 402 names the channel terms; with a `refund`
payment the node claims its charge and returns the rest (node/payment/x402/refund.py, docs/x402.md)."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse

from node.api.deps import NodeServices, services
from node.api.error_handlers import error_responses
from node.api.routes.info import NotFound
from node.payment.x402.channel_check import X402Refused
from node.payment.x402.gas_cover import GAS_NOT_COVERED
from node.payment.x402.refund import X402Refunds
from node.payment.x402.terms import PaymentChallenge, payment_required
from node.payment.x402.wire import PAYMENT_RESPONSE_HEADER, encode_header

router = APIRouter(prefix="/x402", tags=["x402"])


async def _refunds(svc: Annotated[NodeServices, Depends(services)]) -> X402Refunds:
    if svc.x402_refunds is None:
        raise NotFound("this node serves no x402 refunds (no router, or its indexer does not mirror the channel "
                       "contract: loranode chain x402)")
    return svc.x402_refunds


@router.get("/refund", responses=error_responses(400, 402, 404, 503))
async def refund(request: Request, refunds: Annotated[X402Refunds, Depends(_refunds)],
                 payment: Annotated[str | None, Header(alias="PAYMENT-SIGNATURE")] = None) -> JSONResponse:
    """Refund what the node has not charged on the payer's channel (all of it, or the payment's `amount`)."""
    url = str(request.url)
    if payment is None:
        raise _challenge(refunds, url, None)
    try:
        settled: dict[str, Any] = await asyncio.to_thread(refunds.refund, payment)
    except X402Refused as exc:
        raise _challenge(refunds, url, exc) from exc
    return JSONResponse(settled, headers={PAYMENT_RESPONSE_HEADER: encode_header(settled)})


def _challenge(refunds: X402Refunds, url: str, refused: X402Refused | None) -> PaymentChallenge:
    states = {"channel_state": refused.channel_state, "voucher_state": refused.voucher_state} if refused else {}
    reason = refused.reason if refused is not None else None
    required = payment_required(url, [refunds.x402.terms.requirements(0, **states)], reason)
    message = refused.message if refused is not None else "send a batch-settlement refund payment (PAYMENT-SIGNATURE)"
    facts = {k: v for k, v in refused.facts.items() if k != "reason"} if refused is not None else {}
    # a refusal asking again cannot change is final to the SDK with a failed PAYMENT-RESPONSE: its `refund()`
    # then raises with our reason and message (how much more to be charged, or withdraw yourself), where it
    # asked again and raised "server returned 402" alone
    response = {"success": False, "errorReason": reason, "errorMessage": message, "transaction": "",
                "network": refunds.x402.terms.network} if reason == GAS_NOT_COVERED else None
    return PaymentChallenge(message, required, response=response, reason=reason, **facts)
