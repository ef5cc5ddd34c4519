"""POST /v1/completions and /v1/chat/completions: the paid OpenAI endpoints; and the exact quote of a
request body for either (POST /v1/quote/completions, /v1/quote/chat/completions)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError

from node.api.choice import Kind
from node.api.deps import GenerationDep, LedgerDep
from node.api.error_handlers import error_responses
from node.api.paid_route import PaidRoute
from node.api.request_body import read_body
from node.api.request_fields import refuse_unapplied
from node.api.schemas import ChatCompletionRequest, ChatCompletionResponse, CompletionRequest, CompletionResponse
from node.chain.receipt_read import HEADER
from node.errors import BadRequest

router = APIRouter(prefix="/v1", tags=["inference"])
M = TypeVar("M", bound=BaseModel)
PaymentHeader = Annotated[str | None, Header(alias="X-Payment", description="base64url JSON of a signed voucher")]
X402Header = Annotated[str | None, Header(alias="PAYMENT-SIGNATURE",
                                          description="x402 v2 batch-settlement payment (base64 JSON), docs/x402.md")]
# the payer's signed EIP-712 ReceiptRead of the receipt a 409 names: replays the answer of a voucher
# already in an epoch (docs/api.md; left out of the OpenAPI document, which every request would fill)
ReadHeader = Annotated[str | None, Header(alias=HEADER, include_in_schema=False)]
MAX_BODY_BYTES = 1 << 20


async def _parse(request: Request, model: type[M]) -> tuple[M, bytes]:
    body = await read_body(request, MAX_BODY_BYTES)
    try:
        req = model.model_validate_json(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise BadRequest(f"{where}: {first['msg']}", param=where, errors=exc.error_count()) from exc
    refuse_unapplied(req.model_extra or {})
    return req, body


def _openapi(model: type[BaseModel]) -> dict[str, object]:
    """The request body's schema for the OpenAPI document (the route reads the raw bytes itself)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: object) -> object:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return inline(defs[ref.removeprefix("#/$defs/")])
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inline(schema)}}}}


# One server-sent event of a streamed answer: a JSON chunk (the last one carries usage and receipt),
# an error that ended the stream, or the final `[DONE]`.
_CHUNK = {"type": "object", "anyOf": [{"required": ["id", "object", "choices"]}, {"required": ["error"]}]}
SSE_EVENT = {"type": "object", "required": ["data"], "properties": {"data": {"anyOf": [
    {"const": "[DONE]"}, {"type": "string", "contentMediaType": "application/json", "contentSchema": _CHUNK}]}}}
# Every refusal of a paid request (see node/api/generation.py), and the streamed answer's media type.
PAID_RESPONSES = {**error_responses(400, 401, 402, 403, 404, 409, 413, 422, 429, 503),
                  200: {"content": {"text/event-stream": {"schema": SSE_EVENT}},
                        "description": "the answer; server-sent events when `stream` is true"}}


def _paid(path: str, response_model: type[BaseModel],
          request_model: type[BaseModel]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """`@router.post` for a paid endpoint: documented alike, served by node/api/paid_route.py."""
    def add(endpoint: Callable[..., Any]) -> Callable[..., Any]:
        router.add_api_route(path, endpoint, methods=["POST"], response_model=response_model,
                             responses=PAID_RESPONSES, openapi_extra=_openapi(request_model),
                             route_class_override=PaidRoute)
        return endpoint
    return add


@_paid("/completions", CompletionResponse, CompletionRequest)
async def completions(request: Request, generation: GenerationDep,
                      payment: PaymentHeader = None, x402: X402Header = None,
                      read: ReadHeader = None) -> JSONResponse | StreamingResponse:
    req, body = await _parse(request, CompletionRequest)
    return await generation.handle("completion", req, body, payment, request, x402, read)


@_paid("/chat/completions", ChatCompletionResponse, ChatCompletionRequest)
async def chat_completions(request: Request, generation: GenerationDep,
                           payment: PaymentHeader = None, x402: X402Header = None,
                           read: ReadHeader = None) -> JSONResponse | StreamingResponse:
    req, body = await _parse(request, ChatCompletionRequest)
    return await generation.handle("chat", req, body, payment, request, x402, read)


QuotePayer = Annotated[str | None, Query(pattern=r"^0x[0-9a-fA-F]{40}$",
                                         description="with `lane`: the answer adds that lane's chargedTotal")]
QuoteLane = Annotated[int, Query(ge=0, lt=2**32)]


async def _quote(kind: Kind, model: type[CompletionRequest] | type[ChatCompletionRequest], request: Request,
                 generation: GenerationDep, ledger: LedgerDep, payer: str | None, lane: int) -> dict[str, Any]:
    req, _ = await _parse(request, model)
    prompt_tokens, max_tokens, max_fee = await generation.quote(kind, req, payer)
    out: dict[str, Any] = {"promptTokens": prompt_tokens, "maxTokens": max_tokens, "maxFee": str(max_fee)}
    if payer is not None:
        channel = await asyncio.to_thread(ledger.channel, payer, lane)
        out |= {"payer": payer, "lane": lane, "chargedTotal": str(channel.charged_total),
                "lastCumulative": str(channel.last_cumulative)}
    return out


@router.post("/quote/completions", responses=error_responses(400, 404, 413, 422, 503),
             openapi_extra=_openapi(CompletionRequest))
async def quote_completion(request: Request, generation: GenerationDep, ledger: LedgerDep,
                           payer: QuotePayer = None, lane: QuoteLane = 0) -> dict[str, Any]:
    """What the node would hold for this exact /v1/completions body: its prompt tokens, max_tokens and
    `maxFee`; a voucher for `chargedTotal + maxFee` pays for it (nothing is held or charged here)."""
    return await _quote("completion", CompletionRequest, request, generation, ledger, payer, lane)


@router.post("/quote/chat/completions", responses=error_responses(400, 404, 413, 422, 503),
             openapi_extra=_openapi(ChatCompletionRequest))
async def quote_chat_completion(request: Request, generation: GenerationDep, ledger: LedgerDep,
                                payer: QuotePayer = None, lane: QuoteLane = 0) -> dict[str, Any]:
    """The same as POST /v1/quote/completions for a /v1/chat/completions body."""
    return await _quote("chat", ChatCompletionRequest, request, generation, ledger, payer, lane)
