"""The one table that turns errors into HTTP answers with OpenAI-style bodies.

Every NodeError carries its status; this module only shapes the body, so a new error class needs no
new handler. Malformed JSON and schema violations are 400 (OpenAI's convention), not FastAPI's 422.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from requests import RequestException
from sqlalchemy.exc import InterfaceError, OperationalError

from node.api.schemas import ErrorResponse
from node.errors import NodeError
from node.payment.x402.terms import PaymentChallenge
from node.payment.x402.wire import PAYMENT_REQUIRED_HEADER, PAYMENT_RESPONSE_HEADER, encode_header

log = logging.getLogger(__name__)

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "insufficient_quota",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI `responses` of a route that can answer these error statuses (one body shape)."""
    return {status: {"model": ErrorResponse, "description": ERROR_TYPES[status]} for status in statuses}


def error_response(status: int, code: str, message: str, param: str | None = None,
                   extra: dict[str, object] | None = None, retry_after_s: int = 1) -> JSONResponse:
    body: dict[str, object] = {"message": message, "type": ERROR_TYPES.get(status, "server_error"),
                               "code": code, "param": param}
    if extra:
        body.update(extra)
    headers = {"Retry-After": str(retry_after_s)} if status in (429, 503) else None
    return JSONResponse({"error": body}, status_code=status, headers=headers)


async def _node_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, NodeError)
    if exc.status >= 500:
        log.warning("request failed: %s %s", exc.code, exc.message)
    param = exc.facts.get("param")  # the request field at fault, when there is one
    retry_after_s = exc.facts.get("retry_after_s")  # when the error says how long to wait
    return error_response(exc.status, exc.code, exc.message, param=param if isinstance(param, str) else None,
                          extra={"details": exc.to_dict()},
                          retry_after_s=max(retry_after_s, 1) if isinstance(retry_after_s, int) else 1)


async def _payment_challenge(_: Request, exc: Exception) -> JSONResponse:
    """402 with x402 v2 `PaymentRequired` in the PAYMENT-REQUIRED header (what x402 clients read), and
    in the body's error as `x402` (docs/x402.md)."""
    assert isinstance(exc, PaymentChallenge)
    body = {"message": exc.message, "type": ERROR_TYPES[402], "code": exc.code, "param": None,
            "details": exc.to_dict(), "x402": exc.required}
    headers = {PAYMENT_REQUIRED_HEADER: encode_header(exc.required)}
    if exc.response is not None:
        headers[PAYMENT_RESPONSE_HEADER] = encode_header(exc.response)
    return JSONResponse({"error": body}, status_code=exc.status, headers=headers)


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
    message = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body')}: {e.get('msg')}"
                        for e in exc.errors()[:5])
    return error_response(400, "invalid_request", message or "invalid request", param=param)


async def _database_error(_: Request, exc: Exception) -> JSONResponse:
    """The database is down or unreachable: 503, and nothing was charged (the transaction did not commit)."""
    log.warning("database unavailable: %s", type(exc).__name__)
    return error_response(503, "database_unavailable", "the node's database is not available; retry shortly")


async def _chain_rpc_error(_: Request, exc: Exception) -> JSONResponse:
    """The chain's RPC did not answer a read or a send made on the request's path (web3's HTTP provider: an
    x402 deposit's simulation, the chain's time): 503 with a Retry-After, as for the database, not a 500."""
    log.warning("chain RPC unavailable: %s", type(exc).__name__)
    return error_response(503, "chain_unavailable", "the node's chain RPC is not answering; retry shortly")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(NodeError, _node_error)
    app.add_exception_handler(RequestException, _chain_rpc_error)
    app.add_exception_handler(PaymentChallenge, _payment_challenge)
    app.add_exception_handler(OperationalError, _database_error)
    app.add_exception_handler(InterfaceError, _database_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    _document_validation_as_400(app)


def _document_validation_as_400(app: FastAPI) -> None:
    """FastAPI documents a 422 for every route with parameters; this table answers those with 400
    (declared on each route), so the schema drops FastAPI's 422 and its validation-error models."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        schema = build()  # built once and cached by FastAPI; trimming it again changes nothing
        for operation in (op for path in schema["paths"].values() for op in path.values()):
            if "HTTPValidationError" in str(operation["responses"].get("422", {}).get("content", {})):
                del operation["responses"]["422"]
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
