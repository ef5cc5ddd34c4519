"""The CPU a paid request costs the API in starlette and FastAPI: POST /v1/completions through the app
(node/api/app.py, served by node/api/paid_route.py) next to the same endpoint under FastAPI's own route
(its per-request dependency resolution), both to a generation that does nothing, in one process with no
sockets. CPU time (`time.process_time`), best of `--rounds` x `--requests`, the two alternated.

    python bench/paid_route.py [--rounds 7] [--requests 1000]
Prints a table and writes bench/results/paid_route.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from node.api.app import create_app  # noqa: E402
from node.api.routes import inference  # noqa: E402

BODY = b'{"model":"1","prompt":"hello there","max_tokens":32}'


class Generation:
    async def handle(self, *_: Any) -> JSONResponse:
        return JSONResponse({"ok": True})


def fastapi_route_app(services: Any) -> FastAPI:
    app = FastAPI()
    app.state.services = services
    app.router.add_api_route("/v1/completions", inference.completions, methods=["POST"],
                             response_model=inference.CompletionResponse, route_class_override=APIRoute)
    return app


async def cpu_per_request(app: Any, n: int) -> float:
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"", "root_path": "",
             "headers": [(b"host", b"node"), (b"content-type", b"application/json"), (b"x-payment", b"v" * 400),
                         (b"content-length", str(len(BODY)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2)}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": BODY, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        assert message["type"] != "http.response.start" or message["status"] == 200, message

    started = time.process_time()
    for _ in range(n):
        await app(dict(scope, state={}), receive, send)
    return (time.process_time() - started) / n * 1e3


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--requests", type=int, default=1000)
    args = ap.parse_args()
    services = types.SimpleNamespace(generation=Generation())
    apps = {"paid route (the app)": create_app(services), "FastAPI's route": fastapi_route_app(services)}  # type: ignore[arg-type]
    best = {name: float("inf") for name in apps}
    for app in apps.values():
        await cpu_per_request(app, 100)  # warm up
    for _ in range(args.rounds):
        for name, app in apps.items():
            best[name] = min(best[name], await cpu_per_request(app, args.requests))
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    for name, ms in best.items():
        print(f"{name:<24}{ms:>8.3f} ms of CPU per request")
    print(f"uptime: {uptime}")
    out = ROOT / "bench" / "results" / "paid_route.json"
    out.write_text(json.dumps({"cpu_ms_per_request": best, "rounds": args.rounds, "requests": args.requests,
                               "uptime": uptime}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    asyncio.run(main())
