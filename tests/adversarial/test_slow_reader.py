"""A client that reads its stream slowly, so that the node is still handing it tokens when the hold
expires, is charged for every token the node handed it: the node charges, while the hold still can be,
for what it has sent, and sends nothing more. (Otherwise the charge at the end of the stream finds the
hold expired, the tokens are a DELIVERED_UNCHARGED loss, and the client reads the whole answer free.)
Nor does a reader that stops reading keep its place among the requests in flight: once its stream is
charged, others are served in its place. Live node on anvil with a short hold and room for one request
in flight; the slow reader is a plain socket that stops reading for a while."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest

from node.client.payer import Payer
from node.db.loss import LossReason, losses
from node.devkit.local_node import LocalNode
from tests.fixtures.database import POSTGRES_ENV
from tests.fixtures.paid_node import PaidNode, _fresh_postgres, build_paid_node

pytestmark = [pytest.mark.chain, pytest.mark.slow]
HOLD_TTL_S = 3.0  # the hold expires this soon: the generation's time limit is 90% of it (less clock skew)
STALL_S = 6.0  # the reader stops reading this long: past the hold's life


@pytest.fixture(scope="module")
def short_hold(tiny_model: Path, tiny_adapters: object, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[PaidNode]:
    data_dir = tmp_path_factory.mktemp("slow-reader")
    db_url = os.environ.get(POSTGRES_ENV)
    local = LocalNode.start_chain(data_dir, database_url=_fresh_postgres(db_url) if db_url else None,
                                  prompt_token_price=10**9, completion_token_price=2 * 10**9,
                                  reservation_ttl_s=HOLD_TTL_S)
    try:
        yield build_paid_node(local, tiny_model, tiny_adapters.paths["sea-r8"], data_dir,  # type: ignore[attr-defined]
                              max_in_flight=1)
    finally:
        local.stop()


def _read_stalled(base_url: str, body: bytes, header: str, meanwhile: Callable[[], None]) -> bytes:
    """POST the body, read the response's first bytes, stop reading for STALL_S (calling `meanwhile` once
    the hold's life is over), then read it all."""
    url = urlparse(base_url)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the reader's own socket: as small as it likes
    sock.connect((url.hostname, url.port))
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: application/json\r\n"
            f"X-Payment: {header}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    sock.sendall(head + body)
    got = [sock.recv(1024)]
    stalled = time.monotonic()
    time.sleep(HOLD_TTL_S + 1.0)
    meanwhile()
    time.sleep(max(stalled + STALL_S - time.monotonic(), 0))
    sock.settimeout(30)
    while chunk := sock.recv(65536):
        got.append(chunk)
    sock.close()
    return b"".join(got)


def _events(raw: bytes) -> list[dict[str, object]]:
    text = raw.decode(errors="replace")
    return [json.loads(line.removeprefix("data: ")) for line in text.splitlines() if line.startswith("data: {")]


def test_a_client_reading_past_the_hold_pays_for_every_token_it_was_sent(short_hold: PaidNode) -> None:
    payer, lane = Payer(short_hold.payer_keys[1], short_hold.base_url), 3
    body = json.dumps({"model": str(short_hold.adapter_id), "messages": [{"role": "user", "content": "the sea"}],
                       "max_completion_tokens": 2_000, "n": 16, "logprobs": True, "top_logprobs": 20,
                       "stream": True, "temperature": 1.0, "seed": 1}).encode()
    header = payer.payment_header(body, lane, "/v1/chat/completions")
    other = Payer(short_hold.payer_keys[0], short_hold.base_url).openai(lane=lane, max_retries=0)
    served: list[object] = []

    def another_client() -> None:  # while the slow reader still reads nothing
        served.append(other.completions.create(model=str(short_hold.adapter_id), prompt="the sea", max_tokens=2))

    events = _events(_read_stalled(short_hold.base_url, body, header, another_client))
    assert served, "another client was not served while the slow reader stalled"
    tokens_read = sum(len(c["logprobs"]["content"]) for e in events for c in e.get("choices", [])  # type: ignore[union-attr]
                      if c.get("logprobs"))
    assert tokens_read > 0
    svc = short_hold.local.services
    assert svc is not None
    deadline = time.monotonic() + 10
    while (charged := int(payer.channel(lane)["chargedTotal"])) == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    with svc.db() as session:
        lost = [x for x in losses(session, svc.payments.node, payer.address)
                if x.lane == lane and x.reason is LossReason.DELIVERED_UNCHARGED]
    assert not lost, f"{tokens_read} tokens read, none paid: {lost}"
    assert charged >= 2 * 10**9 * tokens_read, f"{tokens_read} tokens read, {charged} charged"
