"""A node (or a hop between it and the client) that misreports a lane gets the SDK to sign no more than
the payer already authorized there.

The SDK signs `chargedTotal + maxFee` with both numbers from the node's quote, and, after a large request,
`lastCumulative + 1` (the node refuses a voucher below one it accepted). The voucher's cumulative is
what the escrow contract lets the node collect on the lane: a node that reports a charged total or a
last voucher above anything the payer signed would be handed a voucher for the whole escrow. A `Payer`
remembers the most it signed on each lane and refuses such a quote with nothing signed. Live node on
anvil; the lying node is a relay that rewrites the lane's numbers in the node's answers."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from node.client.payer import Payer
from node.errors import PaymentError
from node.protocol.voucher import decode_payment_header
from tests.fixtures.paid_node import PaidNode

pytestmark = pytest.mark.chain
INFLATED = 10**30  # far above this payer's escrow


class LyingHop:
    """Relays HTTP to `upstream`; once `lie` names a field (`lastCumulative` or `chargedTotal`), every lane
    figure of that name in the node's answers (and X-Charged-Total) reads INFLATED. It records the
    cumulative of every voucher it relays."""

    def __init__(self, upstream: str) -> None:
        self.upstream, self.lie, self.signed = upstream, "", []  # type: ignore[var-annotated]
        hop = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                self._relay(None)

            def do_POST(self) -> None:
                self._relay(self.rfile.read(int(self.headers["Content-Length"])))

            def _relay(self, body: bytes | None) -> None:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                if "X-Payment" in self.headers:
                    hop.signed.append(decode_payment_header(self.headers["X-Payment"]).cumulative)
                resp = httpx.request(self.command, hop.upstream + self.path, content=body, headers=headers,
                                     timeout=60)
                content = resp.content
                if hop.lie and resp.headers.get("content-type", "").startswith("application/json"):
                    data = resp.json()
                    if isinstance(data, dict) and hop.lie in data:
                        data[hop.lie] = str(INFLATED)
                    content = json.dumps(data).encode()
                self.send_response(resp.status_code)
                for k, v in resp.headers.items():
                    if k.lower() in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                        continue
                    self.send_header(k, str(INFLATED) if hop.lie and k.lower() == "x-charged-total" else v)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture
def hop(paid_node: PaidNode) -> Iterator[LyingHop]:
    relay = LyingHop(paid_node.base_url)
    yield relay
    relay.server.shutdown()


def _ask(client: object, node: PaidNode, max_tokens: int, stop: list[str] | None = None) -> object:
    return client.completions.create(model=str(node.adapter_id), prompt="the sea",  # type: ignore[attr-defined]
                                     max_tokens=max_tokens, temperature=0, stop=stop)


@pytest.mark.parametrize(("lane", "lie", "budget"), [
    (130, "lastCumulative", None), (131, "chargedTotal", None), (132, "chargedTotal", 10**15),
], ids=["last voucher, quoted", "charged total, quoted", "charged total, fixed budget"])
def test_a_node_that_misreports_a_lane_gets_nothing_signed_beyond_what_the_payer_authorized(
        paid_node: PaidNode, hop: LyingHop, lane: int, lie: str, budget: int | None) -> None:
    payer = Payer(paid_node.payer_keys[1], hop.url, budget=budget)
    client = payer.openai(lane=lane, max_retries=0)
    _ask(client, paid_node, 8)  # an honest first request: the payer now knows what it signed on the lane
    hop.lie = lie
    if budget is not None:
        _ask(client, paid_node, 2)  # signed on what it knew; the answer's X-Charged-Total lies
    body = json.dumps({"model": str(paid_node.adapter_id), "prompt": "the sea", "max_tokens": 2}).encode()
    with pytest.raises(PaymentError):
        payer.payment_header(body, lane, "/v1/completions")
    hop.lie = ""
    _ask(client, paid_node, 2)  # told the truth again, it pays as before
    assert max(hop.signed) < INFLATED


def test_an_honest_node_after_a_large_request_still_gets_last_plus_one(paid_node: PaidNode, hop: LyingHop) -> None:
    """The SDK's memory of what it signed refuses no honest quote: a small request after a large one is
    signed just above the lane's last voucher, as before."""
    payer = Payer(paid_node.payer_keys[1], hop.url)
    client = payer.openai(lane=133, max_retries=0)
    _ask(client, paid_node, 40, stop=[" ", "."])  # cut short: most of its voucher is left unspent
    large = hop.signed[-1]
    _ask(client, paid_node, 2)
    assert hop.signed[-1] == large + 1
