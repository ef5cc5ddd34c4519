"""An SDK retry of a request that was served is not charged a second time.

The node answers the same signed request again from its store, free (an idempotent replay). But the
SDK (`Payer.http_client`, the hook under `Payer.openai`) signs each attempt anew on top of the lane's
charged total as the node reports it at that moment: once the first attempt was charged, the retry
is a new voucher for a new generation, charged again, although the payer asked once and got one
answer. Here a hop between client and node (a load balancer, a flaky network) loses the first answer
after the node committed it; the official `openai` client retries, as it does on any connection error.
Live node on anvil; the lossy hop is a plain HTTP relay."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import openai
import pytest

from node.client.payer import Payer
from node.db.models import EpochState
from node.settlement.policy import EpochPolicy
from node.settlement.runtime import SettlementRuntime
from tests.fixtures.paid_node import PaidNode

pytestmark = pytest.mark.chain


class LossyHop:
    """Relays HTTP to `upstream`; the first paid POST reaches the node, whose answer is then lost."""

    def __init__(self, upstream: str) -> None:
        self.upstream, self.num_lost = upstream, 0
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
                resp = httpx.request(self.command, hop.upstream + self.path, content=body, headers=headers, timeout=60)
                if body is not None and self.path.endswith("/completions") and hop.num_lost == 0:
                    hop.num_lost += 1  # the node answered (and charged); the client never hears of it
                    hop.lost()
                    self.close_connection = True
                    return
                self.send_response(resp.status_code)
                for k, v in resp.headers.items():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(resp.content)))
                self.end_headers()
                self.wfile.write(resp.content)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def lost(self) -> None:
        """What happens between the lost answer and the client's retry (here: nothing)."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture(scope="module")
def paid_node(paid_node_each_backend: PaidNode) -> PaidNode:
    """On SQLite and on PostgreSQL (when configured): a retry is answered from the stored response and
    charge as each database stores them."""
    return paid_node_each_backend


@pytest.fixture
def lossy(paid_node: PaidNode) -> Iterator[LossyHop]:
    hop = LossyHop(paid_node.base_url)
    yield hop
    hop.server.shutdown()


@pytest.mark.parametrize("budget", [None, 10**15], ids=["quote budget", "fixed budget"])
def test_a_retried_request_is_charged_once(paid_node: PaidNode, lossy: LossyHop, budget: int | None) -> None:
    lane = 120 if budget is None else 121
    payer = Payer(paid_node.payer_keys[1], lossy.url, budget=budget)
    out = payer.openai(lane=lane, max_retries=2).completions.create(
        model=str(paid_node.adapter_id), prompt="the sea", max_tokens=4, temperature=0)
    assert lossy.num_lost == 1  # the first answer was lost, the retry answered
    fee = int(out.model_extra["receipt"]["fee"])
    charged = int(Payer(paid_node.payer_keys[1], paid_node.base_url).channel(lane)["chargedTotal"])
    assert charged == fee, f"charged {charged} for one answer of fee {fee}"


class SettlingHop(LossyHop):
    """A LossyHop that, once the node has answered (and charged) a lost request, puts that charge in an
    epoch before the client's retry arrives: the voucher is then public and no longer replays as it is."""

    def __init__(self, upstream: str, settle: Callable[[], None]) -> None:
        super().__init__(upstream)
        self.settle = settle

    def lost(self) -> None:
        self.settle()


@pytest.fixture
def settling(paid_node: PaidNode) -> Iterator[SettlingHop]:
    service = SettlementRuntime.from_settings(paid_node.local.settings, EpochPolicy(max_age_s=0)).service
    service.reconcile()

    def settle() -> None:
        epoch_id = service.close_epoch()
        assert epoch_id is not None and service.run_until_final(epoch_id, timeout_s=60) is EpochState.FINAL

    hop = SettlingHop(paid_node.base_url, settle)
    yield hop
    hop.server.shutdown()


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_a_retry_whose_voucher_was_settled_meanwhile_gets_the_answer_it_paid_for(
        paid_node: PaidNode, settling: SettlingHop, stream: bool) -> None:
    """The answer is lost, the charge lands in a settled epoch, the OpenAI client retries the same bytes:
    the node names the receipt (409) instead of replaying a voucher anyone can now read on chain. The
    SDK proves it is the payer and gets the answer it paid for, charged once."""
    lane = 124 + stream
    settling.num_lost = 0
    payer = Payer(paid_node.payer_keys[1], settling.url)
    client = payer.openai(lane=lane, max_retries=2)
    out = client.completions.create(model=str(paid_node.adapter_id), prompt="the sea", max_tokens=4,
                                    temperature=0, stream=stream)
    if stream:
        chunks = list(out)
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        receipt = chunks[-1].model_extra["receipt"]
    else:
        text, receipt = out.choices[0].text, out.model_extra["receipt"]
    assert settling.num_lost == 1  # the first answer was lost, the retry answered
    assert text and text == payer.receipt(receipt["id"])["output"]
    charged = int(Payer(paid_node.payer_keys[1], paid_node.base_url).channel(lane)["chargedTotal"])
    assert charged == int(receipt["fee"]), f"charged {charged} for one answer of fee {receipt['fee']}"


class PhishingHop(LossyHop):
    """A node (or hop) that answers every paid POST with the settled 409 naming `receipt_id`, a receipt of
    this payer's it did not buy here, and keeps any `X-Receipt-Read` the client sends it."""

    def __init__(self, upstream: str, receipt_id: str) -> None:
        super().__init__(upstream)
        self.receipt_id, self.reads = receipt_id, list[str]()
        hop = self

        class Handler(self.server.RequestHandlerClass):  # type: ignore[name-defined,misc]
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("X-Receipt-Read"):
                    hop.reads.append(self.headers["X-Receipt-Read"])
                body = json.dumps({"error": {"message": "settled", "code": "voucher_conflict", "type": "conflict",
                                             "details": {"receipt_id": hop.receipt_id}}}).encode()
                self.send_response(409)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server.RequestHandlerClass = Handler


def test_the_sdk_signs_no_read_for_a_receipt_a_409_names_that_is_not_its_requests(paid_node: PaidNode) -> None:
    """A read opens a receipt's text at whatever node holds it: the SDK signs one only for the receipt of
    the voucher it sent (its id recomputed from the node-signed fields, whose voucherHash is that
    voucher's), never for any id a 409 names."""
    payer = Payer(paid_node.payer_keys[1], paid_node.base_url)
    secret = payer.openai(lane=126).completions.create(model=str(paid_node.adapter_id), prompt="the sea",
                                                         max_tokens=4, temperature=0)
    hop = PhishingHop(paid_node.base_url, secret.model_extra["receipt"]["id"])
    try:
        with pytest.raises(openai.ConflictError):
            Payer(paid_node.payer_keys[1], hop.url).openai(lane=127, max_retries=0).completions.create(
                model=str(paid_node.adapter_id), prompt="calm", max_tokens=4)
    finally:
        hop.server.shutdown()
    assert hop.reads == [], "the SDK signed a read of another receipt for the node that asked"
