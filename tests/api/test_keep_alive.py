"""The API's connections behind the shipped balancer (deploy/haproxy/haproxy.cfg): paid answers asked on
one client connection all come back with their receipts, and once a request is answered the balancer
leaves no connection open on the API, so none is there for the API to close, when its keep-alive runs
out, under the balancer's next request (which would then die unanswered). A client's idle connection
stays open longer than the balancer keeps one of its own, so that a proxy in front always closes first.
A stream cut between the balancer and its client is charged once and replayed free."""

from __future__ import annotations

import json
import re
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from node.client.payer import Payer
from node.devkit.balancer import SHIPPED_CONFIG, Balancer
from tests.fixtures.paid_node import PaidNode

pytestmark = pytest.mark.chain


def established_on(port: int) -> int:
    """TCP connections this machine has established to `port` on loopback, counted on the server's side."""
    lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return sum(1 for line in lines if (fields := line.split())[3] == "01"
               and fields[1] == f"0100007F:{port:04X}")


def none_left_on(port: int, within_s: float = 2.0) -> bool:
    deadline = time.monotonic() + within_s
    while established_on(port):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_paid_answers_through_the_balancer_leave_no_connection_on_the_api(paid_node: PaidNode,
                                                                         tmp_path: Path) -> None:
    port = paid_node.local.settings.port
    with Balancer({"a": f"127.0.0.1:{port}"}, tmp_path) as lb:
        lb.wait_states({"a": "UP"})
        payer = Payer(paid_node.payer_keys[0], lb.url)
        body = json.dumps({"model": str(paid_node.adapter_id), "prompt": "the sea is", "max_tokens": 3}).encode()
        with payer.http_client(lane=41, base_url=lb.url) as client:
            for _ in range(3):
                answer = client.post("/v1/completions", content=body)
                assert answer.status_code == 200 and answer.json()["receipt"]["fee"]
                assert none_left_on(port), "the balancer kept a connection to the API open after its answer"
        payer.close()


def test_an_idle_client_connection_outlives_the_balancers_keep_alive(paid_node: PaidNode) -> None:
    """The API keeps an idle connection longer than the shipped balancer keeps a client's (and than
    uvicorn's default 5 s, which a request sent 6 s later shows)."""
    shipped = re.search(r"timeout http-keep-alive (\d+)s", SHIPPED_CONFIG.read_text())
    assert shipped is not None and paid_node.local.settings.keep_alive_s > int(shipped.group(1))
    request = b"GET /v1/models HTTP/1.1\r\nHost: node\r\n\r\n"
    with socket.create_connection(("127.0.0.1", paid_node.local.settings.port), timeout=10) as conn:
        conn.sendall(request)
        assert conn.recv(65536).startswith(b"HTTP/1.1 200")
        time.sleep(6)
        conn.sendall(request)
        assert conn.recv(65536).startswith(b"HTTP/1.1 200")


def _last_event(text: str) -> dict[str, Any]:
    return json.loads(text[text.rindex("data: {") + len("data: "):].split("\n", 1)[0])  # type: ignore[no-any-return]


def test_a_stream_cut_at_the_balancer_is_charged_once_and_its_voucher_replays_it(paid_node: PaidNode,
                                                                                  tmp_path: Path) -> None:
    """A client reads a paid stream through the balancer and hangs up at its first event: the lane is
    charged once, for the answer stored under its receipt, and the same bytes and voucher sent again
    (twice) get that answer back, charged nothing more."""
    with Balancer({"a": f"127.0.0.1:{paid_node.local.settings.port}"}, tmp_path) as lb:
        lb.wait_states({"a": "UP"})
        payer, lane = Payer(paid_node.payer_keys[0], lb.url), 42
        body = json.dumps({"model": str(paid_node.adapter_id), "prompt": "the sea is", "max_tokens": 16,
                           "stream": True}).encode()
        headers = {"X-Payment": payer.payment_header(body, lane), "Content-Type": "application/json"}
        with httpx.stream("POST", f"{lb.url}/v1/completions", content=body, headers=headers, timeout=30) as cut:
            assert cut.status_code == 200 and b"data: {" in next(cut.iter_raw())
        replays = []
        deadline = time.monotonic() + 20
        while len(replays) < 2 and time.monotonic() < deadline:
            again = httpx.post(f"{lb.url}/v1/completions", content=body, headers=headers, timeout=30)
            if again.status_code == 409:  # the hang-up is still being charged
                time.sleep(0.2)
                continue
            assert again.status_code == 200
            replays.append(_last_event(again.text))
        charged = int(payer.channel(lane)["chargedTotal"])
        payer.close()
    assert len(replays) == 2 and replays[0]["receipt"] == replays[1]["receipt"]
    assert int(replays[0]["receipt"]["fee"]) == charged == int(replays[0]["receipt"]["chargedTotal"])
