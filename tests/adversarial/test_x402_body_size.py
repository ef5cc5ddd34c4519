"""Nobody makes the node hold a huge request body in memory through its x402 facilitator endpoints.

POST /x402/verify and /x402/settle take anyone's body, with no key: each was read whole into memory
before its size was checked (64 KiB), so a few bodies of a few GiB each, sent slowly or at once, took the
node's memory, and the node with it, from every paying user. Now, as on the paid endpoints, a body
declared too large is refused (413) before any of it is read, and one sent without a length as soon as
it passes the limit. Live node with x402 on anvil; the bodies go over a raw socket, as an attacker's would."""

from __future__ import annotations

import socket
from urllib.parse import urlparse

import pytest

from tests.fixtures.paid_node import PaidNode

pytestmark = [pytest.mark.chain, pytest.mark.slow]
SENT = 256 * 1024  # what the client sends before it waits: four times the limit, a sliver of what it declares
DECLARED = 4 << 30


def _status_after_part_of_a_body(node: PaidNode, path: str, chunked: bool) -> int:
    """Send the headers of a huge body and SENT bytes of it, then wait (5 s) for the node's answer."""
    url = urlparse(node.base_url)
    with socket.create_connection((url.hostname, url.port), timeout=5) as conn:
        length = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {DECLARED}"
        conn.sendall(f"POST {path} HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: application/json\r\n"
                     f"{length}\r\n\r\n".encode())
        part = b"[" + b"0," * (SENT // 2)
        conn.sendall(f"{len(part):x}\r\n".encode() + part + b"\r\n" if chunked else part)
        try:
            head = conn.recv(64)
        except TimeoutError:
            pytest.fail(f"{path} still reads a body of {'unbounded' if chunked else DECLARED} bytes")
        return int(head.split(b" ")[1])


@pytest.mark.parametrize("path", ["/x402/verify", "/x402/settle"])
@pytest.mark.parametrize("chunked", [False, True], ids=["declared", "chunked"])
def test_a_huge_body_is_refused_before_it_is_read(x402_node: PaidNode, path: str, chunked: bool) -> None:
    assert _status_after_part_of_a_body(x402_node, path, chunked) == 413
