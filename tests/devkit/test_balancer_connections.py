"""The shipped HAProxy configuration's connections to the replicas, in front of two raw HTTP servers
that count what reaches them: a replica closing a connection as a request arrives on it never fails
that request (HAProxy never reuses a connection to a replica), a request a replica read is never sent
to another one (it may be a paid request the first one served), and a request that found a replica's
port closed goes to the other replica."""

from __future__ import annotations

import json
import socketserver
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from node.chain.anvil import free_port
from node.devkit.balancer import Balancer


@dataclass
class _Replica:
    """What each connection does with its requests: answers the first one; the next, "close" closes the
    connection without an answer (as a server whose keep-alive timer ran out as it came), "answer"
    answers. `drop` closes every connection as soon as it has read a request (a replica that died)."""
    name: str
    next_request: str = "close"
    drop: bool = False
    requests: list[bytes] = field(default_factory=list)  # every request but the health checks'
    server: socketserver.ThreadingTCPServer | None = None


def _read_request(rfile: object) -> tuple[bytes, bytes] | None:
    """(request line and headers, body) of the next request on the connection; None once it is closed."""
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        line = rfile.readline()  # type: ignore[attr-defined]
        if not line:
            return None
        head += line
    length = next((int(h.split(b":")[1]) for h in head.lower().split(b"\r\n") if h.startswith(b"content-length:")), 0)
    return head, rfile.read(length)  # type: ignore[attr-defined]


def _serve(replica: _Replica) -> socketserver.ThreadingTCPServer:
    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            answered = 0
            while (request := _read_request(self.rfile)) is not None:
                head, _body = request
                if not head.startswith(b"GET /ready"):
                    replica.requests.append(head)
                    if replica.drop or (answered and replica.next_request == "close"):
                        return
                self.wfile.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s"
                                 % (len(replica.name), replica.name.encode()))
                answered += 1
                if b"connection: close" in head.lower():
                    return

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def replicas() -> Iterator[dict[str, _Replica]]:
    out = {name: _Replica(name) for name in ("a", "b")}
    for replica in out.values():
        replica.server = _serve(replica)
    yield out
    for replica in out.values():
        assert replica.server is not None
        replica.server.shutdown()
        replica.server.server_close()


def _address(replica: _Replica) -> str:
    assert replica.server is not None
    return f"127.0.0.1:{replica.server.server_address[1]}"


def _body(model: str) -> bytes:
    return json.dumps({"model": model, "prompt": "the sea is", "stream": True}).encode()


def test_a_replica_closing_a_connection_as_a_request_arrives_fails_no_request(replicas: dict[str, _Replica],
                                                                              tmp_path: Path) -> None:
    """One client connection, requests back to back: the same adapter (its replica each time), then none
    (round robin). Each replica closes a connection on its second request, unanswered: a connection
    HAProxy kept for the next request would end that request (the client's connection closed, or 502)."""
    with Balancer({n: _address(r) for n, r in replicas.items()}, tmp_path) as lb:
        lb.wait_states({"a": "UP", "b": "UP"})
        with httpx.Client(base_url=lb.url, timeout=10) as client:
            served = [client.post("/v1/completions", content=_body("7")) for _ in range(4)]
            served += [client.get("/v1/models") for _ in range(4)]
    assert [r.status_code for r in served] == [200] * 8
    assert len({r.text for r in served[:4]}) == 1 and {r.text for r in served[4:]} == {"a", "b"}
    assert sum(len(r.requests) for r in replicas.values()) == 8


def test_a_request_a_replica_read_is_never_sent_to_another(replicas: dict[str, _Replica], tmp_path: Path) -> None:
    """A replica that read a request and closed the connection without an answer may have served and
    charged it: the balancer answers 502 and sends it nowhere else (only the client may send it again,
    with the same voucher: a replay of the stored answer, never a second charge)."""
    for replica in replicas.values():
        replica.drop = True
    with Balancer({n: _address(r) for n, r in replicas.items()}, tmp_path) as lb:
        lb.wait_states({"a": "UP", "b": "UP"})
        statuses = [httpx.post(f"{lb.url}/v1/completions", content=_body(str(m)), timeout=10).status_code
                    for m in range(6)]
    assert statuses == [502] * 6
    assert sum(len(r.requests) for r in replicas.values()) == 6


def test_a_request_refused_by_a_replica_goes_to_the_other(replicas: dict[str, _Replica], tmp_path: Path) -> None:
    """Replica b passes its health checks (on another port) but refuses connections on its own: a request
    the hash sends there never reached it, and the balancer sends it to a instead."""
    closed = free_port()
    servers = {"a": _address(replicas["a"]), "b": f"127.0.0.1:{closed} port {_address(replicas['b']).split(':')[1]}"}
    replicas["a"].next_request = "answer"
    with Balancer(servers, tmp_path) as lb:
        lb.wait_states({"a": "UP", "b": "UP"})
        served = [httpx.post(f"{lb.url}/v1/completions", content=_body(str(m)), timeout=10) for m in range(12)]
    assert [(r.status_code, r.text) for r in served] == [(200, "a")] * 12
    assert len(replicas["a"].requests) == 12 and not replicas["b"].requests
