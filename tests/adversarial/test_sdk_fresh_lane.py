"""A `Payer` started afresh (a new process, a new machine) on a lane it used before has no memory of what
it signed there. A node (or a hop) that inflates the lane's charged total must not get it to sign on
top of the lie: the fresh payer signs only on figures the lane's last voucher proves, a voucher it
checks is its own. Live node on anvil; the liar is the relay of test_sdk_signing."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from node.chain.receipt_read import HEADER, lane_read_id, sign_read
from node.client.payer import Payer
from node.errors import PaymentError
from tests.adversarial.test_sdk_signing import INFLATED, LyingHop
from tests.fixtures.paid_node import PaidNode

pytestmark = pytest.mark.chain


@pytest.fixture
def hop(paid_node: PaidNode) -> Iterator[LyingHop]:
    relay = LyingHop(paid_node.base_url)
    yield relay
    relay.server.shutdown()


def _body(node: PaidNode) -> bytes:
    return json.dumps({"model": str(node.adapter_id), "prompt": "the sea", "max_tokens": 2}).encode()


def _ask(payer: Payer, node: PaidNode, lane: int) -> Any:
    return payer.openai(lane=lane, max_retries=0).completions.create(model=str(node.adapter_id), prompt="the sea",
                                                                      max_tokens=2, temperature=0)


@pytest.mark.parametrize(("lane", "budget"), [(140, None), (141, 10**15)], ids=["quoted", "fixed budget"])
def test_a_fresh_payer_signs_nothing_on_top_of_an_inflated_charged_total(
        paid_node: PaidNode, hop: LyingHop, lane: int, budget: int | None) -> None:
    _ask(Payer(paid_node.payer_keys[1], hop.url), paid_node, lane)  # an earlier process used the lane
    hop.lie = "chargedTotal"
    fresh = Payer(paid_node.payer_keys[1], hop.url, budget=budget)
    with pytest.raises(PaymentError, match="above any this payer signed"):
        fresh.payment_header(_body(paid_node), lane, "/v1/completions")
    assert max(hop.signed) < INFLATED


def test_a_fresh_payer_on_an_honest_node_pays_on_top_of_the_proven_total(paid_node: PaidNode, hop: LyingHop) -> None:
    """The lane's last voucher proves the node's figures: a fresh payer pays on as before."""
    first = _ask(Payer(paid_node.payer_keys[1], hop.url), paid_node, 142)
    second = _ask(Payer(paid_node.payer_keys[1], hop.url), paid_node, 142)
    charged = int(first.model_extra["receipt"]["chargedTotal"])
    assert int(second.model_extra["receipt"]["chargedTotal"]) == charged + int(second.model_extra["receipt"]["fee"])


def test_a_last_voucher_signed_by_someone_else_proves_nothing(paid_node: PaidNode, hop: LyingHop) -> None:
    """A node that shows another payer's voucher (or one for another lane) as this lane's last one."""
    _ask(Payer(paid_node.payer_keys[0], hop.url), paid_node, 143)  # someone else's lane, a higher voucher
    other = Payer(paid_node.payer_keys[0], hop.url).channel(143)["lastVoucher"]
    _ask(Payer(paid_node.payer_keys[1], hop.url), paid_node, 143)
    fresh = Payer(paid_node.payer_keys[1], hop.url)
    fresh._learn(143, other)
    fresh._learn(143, {**other, "payer": fresh.address})  # the payer field rewritten: the signature is not its
    assert 143 not in fresh._signed
    hop.lie = "chargedTotal"
    with pytest.raises(PaymentError):
        fresh.payment_header(_body(paid_node), 143, "/v1/completions")


def test_a_lanes_last_voucher_is_shown_to_its_payer_only(paid_node: PaidNode) -> None:
    """With the request's bytes, a voucher replays its stored answer: nobody but the payer reads it."""
    owner = Payer(paid_node.payer_keys[1], paid_node.base_url)
    _ask(owner, paid_node, 144)
    url = f"{paid_node.base_url}/v1/channels/{owner.address}/144"
    assert "lastVoucher" not in httpx.get(url, timeout=30).json()
    stranger = Payer(paid_node.payer_keys[0], paid_node.base_url)
    forged = sign_read(stranger.key, stranger.address, lane_read_id(stranger.info.node, 144), stranger.info.domain)
    assert httpx.get(url, headers={HEADER: forged}, timeout=30).status_code == 403
    assert owner.channel(144)["lastVoucher"]["payer"].lower() == owner.address.lower()


class OtherNode:
    """Another node on the same Settlement contract (so the same EIP-712 domain), run by someone who keeps
    the `X-Receipt-Read` a payer's SDK sends it to read its own lane there."""

    def __init__(self, real: str) -> None:
        info = {**httpx.get(f"{real}/v1/node", timeout=30).json(), "node": "0x" + "0b" * 20}
        self.reads: list[str] = []
        other = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                if self.path.startswith("/v1/channels/"):
                    other.reads.append(self.headers[HEADER])
                    body = {"chargedTotal": "0", "lastCumulative": "0", "lastVoucher": None, "quote": {"maxFee": "1"}}
                else:
                    body = info
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


def test_a_lane_read_sent_to_another_node_does_not_open_the_lane_here(paid_node: PaidNode) -> None:
    """Nodes of one Settlement contract share its EIP-712 domain. The read a payer's SDK signs to check its
    lane at another node must not show that other node's operator the payer's last voucher here (with the
    request's bytes, which a client failing over sends to both, it replays the stored answer)."""
    owner = Payer(paid_node.payer_keys[1], paid_node.base_url)
    _ask(owner, paid_node, 145)
    other = OtherNode(paid_node.base_url)
    try:
        Payer(paid_node.payer_keys[1], other.url).channel(145)
    finally:
        other.server.shutdown()
    url = f"{paid_node.base_url}/v1/channels/{owner.address}/145"
    resp = httpx.get(url, headers={HEADER: other.reads[0]}, timeout=30)
    assert resp.status_code == 401 and "lastVoucher" not in resp.json(), resp.text
    assert owner.channel(145)["lastVoucher"]["payer"].lower() == owner.address.lower()
