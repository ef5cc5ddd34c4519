"""The paid endpoints' route (node/api/paid_route.py) hands an endpoint what FastAPI would, without FastAPI's
per-request resolution; it refuses an endpoint that declares anything it would not resolve; and the API's
paid endpoints are served by it."""

from __future__ import annotations

import types
from typing import Annotated, Any

import pytest
from fastapi import APIRouter, FastAPI, Header, Query, Request
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from node.api.app import create_app
from node.api.deps import GenerationDep, LedgerDep
from node.api.paid_route import PaidRoute
from node.api.routes import inference

SENT: list[dict[str, Any]] = [
    {},
    {"X-Payment": "abc"},
    {"x-payment": "lower", "PAYMENT-SIGNATURE": "sig"},
    {"X-Receipt-Read": "read", "X-Payment": ""},
]


class Generation:
    pass


async def endpoint(request: Request, generation: GenerationDep,
                   payment: Annotated[str | None, Header(alias="X-Payment")] = None,
                   x402: Annotated[str | None, Header(alias="PAYMENT-SIGNATURE")] = None,
                   read: Annotated[str | None, Header(alias="X-Receipt-Read")] = None) -> JSONResponse:
    is_ours = generation is request.app.state.services.generation
    return JSONResponse({"payment": payment, "x402": x402, "read": read, "generation": is_ours,
                         "body": (await request.body()).decode()})


def client(route_class: type[APIRoute]) -> TestClient:
    app = FastAPI()
    app.state.services = types.SimpleNamespace(generation=Generation())
    router = APIRouter(route_class=route_class)
    router.add_api_route("/paid", endpoint, methods=["POST"])
    app.include_router(router)
    return TestClient(app)


@pytest.mark.parametrize("headers", SENT)
def test_a_paid_endpoint_gets_the_headers_and_the_generation_fastapi_would_give_it(headers: dict[str, str]) -> None:
    fastapi, paid = client(APIRoute), client(PaidRoute)
    expected = fastapi.post("/paid", headers=headers, content=b'{"a": 1}')
    got = paid.post("/paid", headers=headers, content=b'{"a": 1}')
    assert (got.status_code, got.json()) == (expected.status_code, expected.json())
    assert got.json()["generation"] is True


def test_a_header_sent_twice_reaches_the_endpoint_as_fastapi_gives_it() -> None:
    raw = [("X-Payment", "first"), ("X-Payment", "second")]
    expected = client(APIRoute).post("/paid", headers=raw).json()
    assert client(PaidRoute).post("/paid", headers=raw).json() == expected
    assert expected["payment"] == "first"


def test_a_paid_endpoint_declaring_what_the_route_does_not_resolve_is_refused() -> None:
    async def with_query(request: Request, generation: GenerationDep,
                         lane: Annotated[int, Query()] = 0) -> JSONResponse:
        return JSONResponse({})

    router = APIRouter(route_class=PaidRoute)
    with pytest.raises(TypeError, match="the request, a GenerationDep and headers only"):
        router.add_api_route("/paid", with_query, methods=["POST"])


def test_a_paid_endpoint_taking_another_dependency_is_refused() -> None:
    async def with_ledger(request: Request, ledger: LedgerDep) -> JSONResponse:
        return JSONResponse({})

    router = APIRouter(route_class=PaidRoute)
    with pytest.raises(TypeError, match="the request, a GenerationDep and headers only"):
        router.add_api_route("/paid", with_ledger, methods=["POST"])


def test_the_apis_paid_endpoints_are_served_by_the_paid_route_and_other_methods_still_get_405() -> None:
    paid = {r.path for r in inference.router.routes if isinstance(r, PaidRoute)}
    assert paid == {"/v1/completions", "/v1/chat/completions"}
    app = create_app(types.SimpleNamespace(generation=Generation()))  # type: ignore[arg-type]
    assert TestClient(app).get("/v1/completions").status_code == 405
