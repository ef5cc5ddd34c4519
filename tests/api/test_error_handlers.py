"""The error table (node/api/error_handlers.py) as a client sees it: an RPC that does not answer on a
request's path is a 503 the client may retry, not a 500 (a refused connection, a timeout)."""

from __future__ import annotations

import requests
from fastapi import FastAPI
from fastapi.testclient import TestClient
from web3 import HTTPProvider, Web3

from node.api.error_handlers import install_error_handlers


def test_a_chain_rpc_that_does_not_answer_is_a_503_with_a_retry_after() -> None:
    app = FastAPI()
    install_error_handlers(app)
    w3 = Web3(HTTPProvider("http://127.0.0.1:9", request_kwargs={"timeout": 2}))  # nothing listens on port 9

    @app.get("/chain-time")
    def chain_time() -> int:
        return int(w3.eth.get_block("latest")["timestamp"])  # what X402Chain.now asks

    @app.get("/timeout")
    def timeout() -> None:
        raise requests.Timeout("read timed out")

    client = TestClient(app, raise_server_exceptions=False)
    for path in ("/chain-time", "/timeout"):
        answer = client.get(path)
        assert answer.status_code == 503, (path, answer.text)
        assert answer.json()["error"]["code"] == "chain_unavailable"
        assert answer.headers["Retry-After"] == "1"
