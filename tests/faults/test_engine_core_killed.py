"""The engine core process SIGKILLed under paid load, and stalled: the API stays up and answers its
health checks, every request in flight ends as a node fault (nothing charged; a plain answer's voucher
may be sent again, a stream that had sent tokens is a recorded loss), the core is started again, and
the next requests are served and charged once; a stalled core is killed after the stall timeout and
treated the same way. Real anvil, contracts, API, HTTP and core process."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from node.client.payer import Payer
from node.db.loss import LossReason, losses
from node.devkit.local_node import LocalNode
from node.engine.core_client import CoreClient
from tests.adversarial.attacker import Attacker
from tests.fixtures.paid_node import PaidNode, build_paid_node

pytestmark = pytest.mark.chain
log = logging.getLogger(__name__)
ANSWER_TOKENS = 300  # long enough to be under way when the core is killed
STALL_TIMEOUT_S = 8.0  # the core reports every second; a busy box still does that well within this


@pytest.fixture(scope="module")
def paid(tiny_model: Path, tiny_adapters: object, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PaidNode]:
    data_dir = tmp_path_factory.mktemp("core-killed")
    local = LocalNode.start_chain(data_dir, prompt_token_price=10**9, completion_token_price=2 * 10**9)
    try:
        yield build_paid_node(local, tiny_model, tiny_adapters.paths["sea-r8"], data_dir,  # type: ignore[attr-defined]
                              max_in_flight=16, engine_process=True, engine_stall_timeout_s=STALL_TIMEOUT_S)
    finally:
        local.stop()


def _cores(paid: PaidNode) -> CoreClient:
    assert paid.local.services is not None
    engine = paid.local.services.engine.engine
    assert isinstance(engine, CoreClient)
    return engine


def _attacker(paid: PaidNode) -> Attacker:
    return Attacker(Payer(paid.payer_keys[0], paid.base_url), paid.base_url, str(paid.adapter_id))


def _wait(what: str, ok: object, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not ok():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def _health_within(paid: PaidNode, seconds: float) -> None:
    started = time.monotonic()
    assert httpx.get(f"{paid.base_url}/health", timeout=seconds).status_code == 200
    httpx.get(f"{paid.base_url}/ready", timeout=seconds)  # 200 or 503, but an answer
    assert time.monotonic() - started < seconds


def test_a_core_killed_under_load_charges_nothing_and_the_next_requests_are_served(paid: PaidNode) -> None:
    att, cores = _attacker(paid), _cores(paid)
    plain_lanes, stream_lanes = range(10, 14), range(20, 22)
    before = {lane: att.charged(lane) for lane in (*plain_lanes, *stream_lanes)}
    plain = {lane: att.body(max_tokens=ANSWER_TOKENS) for lane in plain_lanes}
    headers = {lane: att.header(body, lane) for lane, body in plain.items()}
    joins = {lane: att.in_background(lambda b=plain[lane], h=headers[lane]: att.post(b, h)) for lane in plain_lanes}
    streams = {lane: att.body(max_tokens=2_000, stream=True) for lane in stream_lanes}
    stream_headers = {lane: att.header(body, lane) for lane, body in streams.items()}
    stream_joins = {lane: att.in_background(lambda b=streams[lane], h=stream_headers[lane]: att.stream_text(b, h))
                    for lane in stream_lanes}
    _wait("the requests were never admitted", lambda: paid.local.services.engine.in_flight == 6)  # type: ignore[union-attr]
    victim = cores.pids()[0]
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    _health_within(paid, 10.0)  # the API is up while its engine is not (a restart takes longer)

    for lane, join in joins.items():
        resp = join()
        assert resp.status_code == 503, resp.text
        assert att.charged(lane) == before[lane]  # a node fault charges nothing
    num_sent = 0
    for lane, join in stream_joins.items():
        _status, text, events = join()
        assert "error" in events[-1], events[-1:]
        assert att.charged(lane) == before[lane]
        num_sent += bool(text)
    svc = paid.local.services
    assert svc is not None
    with svc.db() as session:
        lost = [x for x in losses(session, svc.payments.node, att.payer.address) if x.amount > 0]
    # a stream that had sent tokens is a recorded loss (its voucher spent); one that had not is released
    assert len(lost) == num_sent and all(x.reason is LossReason.NODE_FAULT for x in lost)

    _wait("the core was not started again", lambda: cores.num_up == 1 and cores.pids()[0] not in (None, victim))
    _wait("the node never came back to ready", lambda: httpx.get(f"{paid.base_url}/ready").status_code == 200)
    retries = {lane: att.in_background(lambda b=plain[lane], h=headers[lane]: att.post(b, h, timeout=300))
               for lane in plain_lanes}  # the same voucher again: never served, so it buys its answer now, once
    for lane, join in retries.items():
        retry = join(timeout=300)
        assert retry.status_code == 200 and "X-Idempotent-Replay" not in retry.headers, retry.text
        assert att.charged(lane) == before[lane] + int(retry.json()["receipt"]["fee"])


def test_a_stalled_core_stalls_neither_health_nor_ready_and_its_requests_end_unpaid(paid: PaidNode) -> None:
    """SIGSTOP: the core's step hangs (so does everything else in it). The API answers its health checks
    at once throughout; after the stall timeout the core is killed, the request it held ends with 503
    (nothing charged, its voucher not burned), /ready says the engine is down until the core is back,
    and the same voucher then buys its answer."""
    cores = _cores(paid)
    _wait("no core up", lambda: cores.num_up == 1)
    victim = cores.pids()[0]
    assert victim is not None
    att, lane = _attacker(paid), 30
    before = att.charged(lane)
    body = att.body(max_tokens=40)  # in flight from its admission on: the core is stopped right after
    header = att.header(body, lane)
    readies: list[dict[str, object]] = []
    stop_polling = threading.Event()

    def poll_ready() -> None:
        while not stop_polling.wait(0.05):
            readies.append(httpx.get(f"{paid.base_url}/ready", timeout=5).json())

    poller = threading.Thread(target=poll_ready, daemon=True)
    started = time.monotonic()
    waiting = att.in_background(lambda: att.post(body, header, timeout=120))
    _wait("the request was never admitted", lambda: paid.local.services.engine.in_flight == 1)  # type: ignore[union-attr]
    os.kill(victim, signal.SIGSTOP)
    try:
        stalled_at = time.monotonic()
        poller.start()
        for _ in range(3):
            _health_within(paid, 2.0)  # it would wait forever if it waited on the core
        resp = waiting(timeout=STALL_TIMEOUT_S + 60)
        ended_at = time.monotonic()
        assert resp.status_code == 503 and resp.json()["error"]["code"] == "unavailable", resp.text
        assert "stalled" in resp.json()["error"]["message"]
        assert ended_at - stalled_at < STALL_TIMEOUT_S + 30  # bounded by the stall timeout
        assert att.charged(lane) == before
        _wait("the core was not started again", lambda: cores.num_up == 1 and cores.pids()[0] not in (None, victim))
        _wait("the node never came back to ready", lambda: bool(readies) and readies[-1]["ready"] is True)
    finally:
        stop_polling.set()
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)
    assert any(r["engine"] is False and r["ready"] is False and r["engineCoresUp"] == 0 for r in readies), \
        "/ready never said the core was down"
    assert readies[0]["engineCores"] == 1
    again = att.post(body, header, timeout=120)  # the same voucher: it was never burned
    assert again.status_code == 200 and "X-Idempotent-Replay" not in again.headers, again.text
    assert att.charged(lane) == before + int(again.json()["receipt"]["fee"])
    log.info("stall test: %.1f s in all, of which %.1f s to end the stalled request", time.monotonic() - started,
             ended_at - stalled_at)
