"""Read-only endpoints: the node, its adapters, quotes, lanes and receipts."""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Query

from node.api.deps import (
    CatalogDep,
    DatabaseDep,
    EngineDep,
    GenerationDep,
    LedgerDep,
    NodeAddress,
    PaymentsDep,
    PricingDep,
    ServicesDep,
)
from node.api.error_handlers import error_responses
from node.api.schemas import MAX_CHOICES
from node.chain.receipt_read import HEADER, authorize_read, channel_read_id, lane_read_id
from node.errors import NodeError, ReadUnauthorized
from node.payment.pricing import Pricing
from node.protocol.hexstr import from_hex
from node.settlement.publication import lane_receipts, payer_view, receipt_document, receipt_with_payer

router = APIRouter(prefix="/v1", tags=["info"])
ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")
HASH = re.compile(r"^0x[0-9a-fA-F]{64}$")
MAX_RECEIPTS_PAGE = 100
ReadHeader = Annotated[str | None, Header(alias=HEADER, description="base64url JSON of the payer's signed "
                                          "EIP-712 ReceiptRead: required to see the receipt's text")]


class NotFound(NodeError):
    status = 404
    code = "not_found"


@router.get("/node", responses=error_responses(503))
def node_info(svc: ServicesDep, payments: PaymentsDep, catalog: CatalogDep, engine: EngineDep) -> dict[str, Any]:
    """Who this node is and what a client needs to sign vouchers for it."""
    domain = payments.domain
    return {"node": payments.node, "chainId": svc.chain_id, "settlement": svc.settlement_address,
            "domain": {"name": domain.name, "version": domain.version, "chainId": domain.chain_id,
                       "verifyingContract": domain.verifying_contract},
            "baseModel": catalog.base_model_id, "baseModelName": catalog.base_model_name,
            "maxModelLen": engine.max_model_len, "minVoucherValiditySeconds": payments.min_validity_s,
            "prices": _prices(payments.pricing), "basePrices": _prices(payments.base_pricing)}


@router.get("/adapters", responses=error_responses(503))
def adapters(catalog: CatalogDep) -> dict[str, Any]:
    """Every adapter registered for this node's base model and what a request for it meets now:
    `serving`, `not_final`, `deprecated`, or `cannot_load` with the reason of its last load."""
    return {"data": [{"id": str(s.adapter_id), "state": s.state, "detail": s.detail} for s in catalog.statuses()]}


@router.get("/quote", responses=error_responses(400))
def quote(pricing: PricingDep, payments: PaymentsDep, catalog: CatalogDep,
          prompt_tokens: int = Query(..., ge=1, le=10**7), max_tokens: int = Query(256, ge=1, le=10**7),
          n: int = Query(1, ge=1, le=MAX_CHOICES, description="choices: each may run to max_tokens"),
          model: str | None = Query(None, max_length=160, description="the base model's name or an adapter id; "
                                    "default: prices that cover either")) -> dict[str, Any]:
    if model is not None:
        pricing = payments.pricing_for(model == catalog.base_model_name)
    return {**_prices(pricing), "promptTokens": prompt_tokens, "maxTokens": max_tokens, "n": n,
            "maxFee": str(pricing.max_fee(prompt_tokens, max_tokens, n))}


@router.get("/channels/{payer}/{lane}", responses=error_responses(400, 401, 403, 503))
def channel(ledger: LedgerDep, pricing: PricingDep, engine: EngineDep, node: NodeAddress, payments: PaymentsDep,
            payer: str = Path(..., pattern=ADDRESS.pattern), lane: int = Path(..., ge=0, lt=2**32),
            max_tokens: int | None = Query(None, ge=1, le=10**7, description="the most the requests will ask "
                                           "for; default: any request that fits the context"),
            read: ReadHeader = None) -> dict[str, Any]:
    """The lane's charged total (sign on top of it) and a quote that covers every request of up to
    `max_tokens` (default: any) that fits the context, so `chargedTotal + quote.maxFee` is never refused.
    With an `X-Receipt-Read` of the payer naming `lane_read_id(node, lane)`, also `lastVoucher`: its own signed
    voucher for `lastCumulative` (null on a new lane), how a client with no memory of the lane checks that
    it authorized the charged total it is asked to sign on top of (only to the payer: with the request's
    bytes, a voucher replays its answer)."""
    ch = ledger.channel(payer, lane)
    longest_prompt, longest_answer, max_fee = context_quote(pricing, engine.max_model_len, max_tokens)
    out = {"payer": payer, "node": node, "lane": lane, "chargedTotal": str(ch.charged_total),
           "lastCumulative": str(ch.last_cumulative), "spendable": str(ch.spendable),
           "quote": {**_prices(pricing), "promptTokens": longest_prompt, "maxTokens": longest_answer,
                     "maxFee": str(max_fee)}}
    if read is not None:
        authorize_read(read, lane_read_id(node, lane), payer, payments.domain, payments.clock())
        out["lastVoucher"] = ch.last_voucher.to_json() if ch.last_voucher is not None else None
    return out


@router.get("/channels/{payer}/{lane}/receipts", responses=error_responses(400, 401, 403, 503))
def channel_receipts(db: DatabaseDep, payments: PaymentsDep, node: NodeAddress,
                     payer: str = Path(..., pattern=ADDRESS.pattern), lane: int = Path(..., ge=0, lt=2**32),
                     limit: int = Query(50, ge=1, le=MAX_RECEIPTS_PAGE),
                     before: int | None = Query(None, ge=1, description="the previous page's `next`"),
                     read: ReadHeader = None) -> dict[str, Any]:
    """The payer's receipts on the lane, newest first, to the payer only (an `X-Receipt-Read` naming
    `lane_read_id(node, lane)`, as for `lastVoucher`): each receipt as `GET /v1/receipts/{id}` shows it
    to anyone, with the lane's `chargedTotal` after it and the voucher's `cumulative`, so an app
    reconciles what it was charged, request by request, without having kept its answers. `next`: the
    `before` of the next page, null on the last. The text stays at `GET /v1/receipts/{id}`."""
    if read is None:
        raise ReadUnauthorized(f"a lane's receipts are its payer's: send {HEADER}, a ReceiptRead of "
                               "lane_read_id(node, lane) signed by the payer", lane=lane)
    authorize_read(read, lane_read_id(node, lane), payer, payments.domain, payments.clock())
    with db() as session:
        rows = lane_receipts(session, payer, node, lane, limit + 1, before)
        page = [{**receipt_document(r, node), "chargedTotal": str(v.charged_total), "cumulative": str(v.cumulative)}
                for r, v in rows[:limit]]
        after = rows[limit - 1][0].id if len(rows) > limit else None
    return {"payer": payer, "node": node, "lane": lane, "receipts": page, "next": after}


@router.get("/x402/channels/{channel_id}/receipts", responses=error_responses(400, 401, 403, 404, 503))
def x402_channel_receipts(db: DatabaseDep, payments: PaymentsDep, generation: GenerationDep, node: NodeAddress,
                          channel_id: str = Path(..., pattern=HASH.pattern),
                          limit: int = Query(50, ge=1, le=MAX_RECEIPTS_PAGE),
                          before: int | None = Query(None, ge=1, description="the previous page's `next`"),
                          read: ReadHeader = None) -> dict[str, Any]:
    """An x402 channel's receipts, newest first, to the channel's payer only (an `X-Receipt-Read` naming
    `channel_read_id(node, channelId)`): as the lane listing above, each with the channel's
    `chargedTotal` after it and the voucher's `cumulative` (its `maxClaimableAmount`). An x402 receipt's
    voucher is the node's router lane voucher: the channel is that lane, its payer the one who reads."""
    if read is None:
        raise ReadUnauthorized(f"a channel's receipts are its payer's: send {HEADER}, a ReceiptRead of "
                               "channel_read_id(node, channelId) signed by the channel's payer", channel_id=channel_id)
    x402 = generation.x402
    lane = x402.book.find_lane(from_hex(channel_id)) if x402 is not None else None
    payer = x402.book.payer_of(lane) if x402 is not None and lane is not None else None
    if x402 is None or lane is None or payer is None:
        raise NotFound(f"no x402 channel {channel_id} at this node", channel_id=channel_id)
    authorize_read(read, channel_read_id(node, channel_id), payer, payments.domain, payments.clock())
    with db() as session:
        rows = lane_receipts(session, x402.router, payments.node.lower(), lane, limit + 1, before)
        page = [{**receipt_document(r, node), "chargedTotal": str(v.charged_total), "cumulative": str(v.cumulative)}
                for r, v in rows[:limit]]
        after = rows[limit - 1][0].id if len(rows) > limit else None
    return {"channelId": channel_id.lower(), "payer": payer, "node": node, "receipts": page, "next": after}


def context_quote(pricing: Pricing, max_model_len: int, max_tokens: int | None) -> tuple[int, int, int]:
    """(longest prompt, longest answer, the most any request within both that fits the context can
    cost). The fee is linear in prompt and answer tokens, and prompt + answer <= max_model_len, so the
    costliest request is the longest prompt with one token or the longest answer with the rest."""
    longest_prompt = max(max_model_len - 1, 1)
    longest_answer = max(min(max_tokens or max_model_len, max_model_len - 1), 1)
    max_fee = max(pricing.max_fee(longest_prompt, 1),
                  pricing.max_fee(max(max_model_len - longest_answer, 1), longest_answer))
    return longest_prompt, longest_answer, max_fee


@router.get("/receipts/{receipt_id}", responses=error_responses(400, 401, 403, 404, 503))
def receipt(db: DatabaseDep, payments: PaymentsDep, generation: GenerationDep,
            receipt_id: str = Path(..., pattern=HASH.pattern), read: ReadHeader = None) -> dict[str, Any]:
    """A receipt with hashes, token counts, offsets and weights only; with an `X-Receipt-Read` signed
    by its payer, also its text: the output (while the node keeps the response) and the evidence spans.
    An x402 receipt's voucher names the node's router: its channel's payer is the one who reads."""
    with db() as session:
        found = receipt_with_payer(session, receipt_id)
        if found is None:
            raise NotFound(f"no receipt {receipt_id}", receipt_id=receipt_id)
        row, voucher = found
        body = receipt_document(row, payments.node)
        if read is None:
            return body
        x402 = generation.x402
        channel_payer = x402.book.payer_of(voucher.lane) if x402 and voucher.payer.lower() == x402.router else None
        reader = channel_payer or voucher.payer
        authorize_read(read, receipt_id, reader, payments.domain, payments.clock())
        return {**body, **payer_view(row, voucher), "payer": reader}


def _prices(p: Pricing) -> dict[str, str]:
    return {"promptTokenPrice": str(p.prompt_token_price), "completionTokenPrice": str(p.completion_token_price),
            "minFee": str(p.min_fee)}
