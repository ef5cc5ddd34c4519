"""The route class of the paid endpoints (POST /v1/completions, /v1/chat/completions): FastAPI documents
them from their signatures like any other route, and serves them without resolving those signatures per
request. That resolution (two dependencies to reach the generation service, three optional headers each
validated by pydantic) cost the API about 0.15 ms of CPU per request: a request through the app to a
generation that does nothing took 0.22-0.29 ms with it, 0.09-0.12 ms without. The API's CPU is what the
engine cores lose on a box they share.

The endpoint gets what FastAPI would give it: the `Request`, the services' generation, and each header
parameter as sent (its first value; None when absent, the default each must have). A paid endpoint
declares nothing else (checked when the route is built), so the document and what is served cannot
drift apart.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, get_args

from fastapi import Request, Response
from fastapi.routing import APIRoute

from node.api.deps import GenerationDep

# the one dependency a paid endpoint may take: the generation service (node/api/deps.py)
_GENERATION = get_args(GenerationDep)[1].dependency


class PaidRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        dependant, endpoint = self.dependant, self.endpoint
        headers = {field.name: field.alias for field in dependant.header_params}
        extra = dependant.path_params or dependant.query_params or dependant.cookie_params or dependant.body_params
        extra = extra or [f for f in dependant.header_params if f.field_info.default is not None]  # absent: None
        request_name, calls = dependant.request_param_name or "", [d.call for d in dependant.dependencies]
        if extra or not request_name or calls != [_GENERATION]:
            raise TypeError(f"{self.path}: a paid endpoint takes the request, a GenerationDep and headers only")
        generation_name = dependant.dependencies[0].name or ""

        async def handle(request: Request) -> Response:
            sent = request.headers
            response = await endpoint(**{request_name: request, generation_name: request.app.state.services.generation},
                                      **{name: sent.get(alias) for name, alias in headers.items()})
            assert isinstance(response, Response), "a paid endpoint answers with a Response of its own"
            return response

        return handle
