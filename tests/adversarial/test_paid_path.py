"""The paid request path under attack, on SQLite and PostgreSQL: no answer is free, a voucher buys one
generation, every accepted value fits the database, a hold is never spent twice, and one voucher or
one SQLite file is never served twice at once. Real anvil, contracts, API and HTTP clients."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import update

from node.chain.anvil import free_port
from node.client.payer import Payer
from node.db.loss import LossReason, losses
from node.db.models import Lane
from node.db.session import make_engine, session_factory
from node.devkit.local_node import settings_env
from node.payment.lane_pg import PipelinedLanes
from node.payment.lane_sqlite import SQLiteLanes
from node.protocol.voucher import PaymentHeader, Voucher, decode_payment_header, sign_voucher, voucher_digest
from tests.adversarial.attacker import Attacker, NodeAborts
from tests.fixtures.database import _backends
from tests.fixtures.paid_node import PaidNode, running_paid_node

pytestmark = pytest.mark.chain
PROMPT_PRICE, COMPLETION_PRICE = 10**9, 2 * 10**9


@pytest.fixture(scope="module", params=_backends())
def paid(request: pytest.FixtureRequest, tiny_model: Path, tiny_adapters: object,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[PaidNode]:
    """A live paid node on SQLite, and one on PostgreSQL when configured."""
    data_dir = tmp_path_factory.mktemp(f"paid-path-{request.param}")
    with running_paid_node(tiny_model, tiny_adapters.paths["sea-r8"], data_dir,  # type: ignore[attr-defined]
                           request.param) as node:
        yield node


def _attacker(paid: PaidNode, i: int = 0) -> Attacker:
    return Attacker(Payer(paid.payer_keys[i], paid.base_url), paid.base_url, str(paid.adapter_id))


def _losses(paid: PaidNode, attacker: Attacker) -> list[tuple[LossReason, int, str | None]]:
    svc = paid.local.services
    assert svc is not None
    with svc.db() as session:
        found = losses(session, svc.payments.node, attacker.payer.address)
    return [(x.reason, x.amount, x.voucher_hash) for x in found]


def _voucher_hash(paid: PaidNode, header: str) -> str:
    """The voucher's id as the node keys it (its EIP-712 digest)."""
    svc = paid.local.services
    assert svc is not None
    h = decode_payment_header(header)
    v = Voucher(h.payer, h.node, h.lane, h.cumulative, h.request_hash, h.deadline)
    return "0x" + voucher_digest(v, svc.payments.domain).hex()


def _wait_held(paid: PaidNode, attacker: Attacker, lane: int, timeout_s: float = 10.0) -> None:
    """Until the lane holds a request in flight (its hold is in the database)."""
    svc = paid.local.services
    assert svc is not None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with svc.db() as session:
            row = session.get(Lane, (attacker.payer.address.lower(), svc.payments.node.lower(), lane))
            if row is not None and row.reserved_voucher_hash is not None:
                return
        time.sleep(0.05)
    raise AssertionError(f"lane {lane} was never held")


def _fee(prompt_tokens: int, completion_tokens: int) -> int:
    return PROMPT_PRICE * prompt_tokens + COMPLETION_PRICE * completion_tokens


# --- 1. no free answers --------------------------------------------------------------------------
def test_a_stream_hung_up_mid_answer_is_charged_and_its_header_buys_no_second_answer(paid: PaidNode) -> None:
    att, lane = _attacker(paid), 100
    body = att.body(stream=True)
    header = att.header(body, lane)
    before = att.charged(lane)
    read = [e["choices"][0]["text"] for e in att.hang_up_after(body, header, chunks=4)]
    seen = "".join(read)
    after = att.charged_once_settled(lane, before)
    assert after > before, "the tokens the attacker read were not charged"
    status, replayed, events = att.stream_text(body, header)  # the same header, the same bytes, again
    assert status == 200
    receipt = events[-1]["receipt"]
    assert replayed.startswith(seen) and 0 < receipt["completionTokens"] < 1_000  # the stored partial answer
    assert receipt["completionTokens"] >= sum(1 for text in read if text)  # every token it read is paid for
    assert int(receipt["fee"]) == after - before == _fee(receipt["promptTokens"], receipt["completionTokens"])
    assert att.charged(lane) == after  # the replay is free, and there was no second generation


def test_a_plain_request_left_mid_generation_is_charged_for_its_partial_answer(paid: PaidNode) -> None:
    att, lane = _attacker(paid), 101
    body = att.body()
    header = att.header(body, lane)
    before = att.charged(lane)
    att.leave_after(body, header, seconds=0.5)
    after = att.charged_once_settled(lane, before)
    assert after > before, "the client that left was not charged for what was generated"
    replay = att.post(body, header)
    assert replay.status_code == 200 and replay.headers["X-Idempotent-Replay"] == "true"
    usage, receipt = replay.json()["usage"], replay.json()["receipt"]
    assert 0 < usage["completion_tokens"] < 1_000 and receipt["completionTokens"] == usage["completion_tokens"]
    assert int(receipt["fee"]) == after - before and att.charged(lane) == after


def test_a_node_fault_after_tokens_left_charges_nothing_records_a_loss_and_spends_the_voucher(
        paid: PaidNode) -> None:
    att, lane = _attacker(paid), 102
    body = att.body(stream=True)
    header = att.header(body, lane)
    before = att.charged(lane)
    with httpx.stream("POST", f"{paid.base_url}/v1/completions", content=body, timeout=30,
                      headers={"X-Payment": header, "Content-Type": "application/json"}) as resp:
        lines = resp.iter_lines()
        for _ in range(3):
            assert next(line for line in lines if line.startswith("data: {"))
        with NodeAborts(paid):
            rest = list(lines)
    assert any('"error"' in line for line in rest), rest[-3:]
    assert att.charged(lane) == before  # a node fault charges nothing
    reasons = [(reason, voucher) for reason, amount, voucher in _losses(paid, att) if amount > 0]
    assert (LossReason.NODE_FAULT, _voucher_hash(paid, header)) in reasons
    again = att.post(body, header)
    assert again.status_code == 409 and "already used" in again.json()["error"]["message"]


def test_a_node_fault_before_any_token_left_charges_nothing_and_the_voucher_may_retry(paid: PaidNode) -> None:
    att, lane = _attacker(paid), 103
    body = att.body()
    header = att.header(body, lane)
    before = att.charged(lane)
    join = att.in_background(lambda: att.post(body, header))
    _wait_held(paid, att, lane)
    time.sleep(0.2)  # generating, nothing sent yet
    with NodeAborts(paid):
        failed = join()
    assert failed.status_code == 503 and att.charged(lane) == before
    retry = att.post(body, header, timeout=300)  # a whole answer of 1,000 tokens: slow on a busy machine
    assert retry.status_code == 200 and "X-Idempotent-Replay" not in retry.headers
    assert att.charged(lane) == before + int(retry.json()["receipt"]["fee"])


def test_a_charge_that_cannot_be_committed_after_tokens_left_is_a_recorded_loss(paid: PaidNode) -> None:
    att, lane = _attacker(paid), 104
    body = att.body(max_tokens=200, stream=True)
    header = att.header(body, lane)
    svc = paid.local.services
    assert svc is not None
    with httpx.stream("POST", f"{paid.base_url}/v1/completions", content=body, timeout=30,
                      headers={"X-Payment": header, "Content-Type": "application/json"}) as resp:
        lines = resp.iter_lines()
        assert next(line for line in lines if line.startswith("data: {"))
        with svc.db.begin() as session:  # the hold is lost under the request (as a takeover would)
            session.execute(update(Lane).where(Lane.payer == att.payer.address.lower(), Lane.lane == lane)
                            .values(reserved=0, reserved_voucher_hash=None, reserved_at=None))
        rest = list(lines)
    assert any('"error"' in line for line in rest)
    assert att.charged(lane) == 0
    assert [r for r, amount, v in _losses(paid, att) if v == _voucher_hash(paid, header) and amount > 0] == [
        LossReason.DELIVERED_UNCHARGED]
    assert att.post(body, header).status_code == 409  # it bought its one generation


def _dead_database(paid: PaidNode) -> tuple[object, object]:
    """The ledger's lanes and sessions on the same backend at an address where nothing answers."""
    svc = paid.local.services
    assert svc is not None
    if isinstance(svc.payments.ledger.lanes, SQLiteLanes):
        engine = make_engine("sqlite:////nonexistent-folder/loranode.db")
        return SQLiteLanes(engine), session_factory(engine)
    engine = make_engine("postgresql+psycopg://nobody@127.0.0.1:1/none?connect_timeout=1")
    return PipelinedLanes(engine), session_factory(engine)


def test_a_charge_the_database_cannot_take_after_tokens_left_is_logged_and_the_voucher_buys_nothing_more(
        paid: PaidNode, caplog: pytest.LogCaptureFixture) -> None:
    att, lane = _attacker(paid), 109
    body = att.body(max_tokens=200, stream=True)
    header = att.header(body, lane)
    ledger = paid.local.services.payments.ledger  # type: ignore[union-attr]
    with httpx.stream("POST", f"{paid.base_url}/v1/completions", content=body, timeout=30,
                      headers={"X-Payment": header, "Content-Type": "application/json"}) as resp:
        lines = resp.iter_lines()
        assert next(line for line in lines if line.startswith("data: {"))
        saved, (ledger.lanes, ledger.factory) = (ledger.lanes, ledger.factory), _dead_database(paid)
        try:  # the database goes away before the charge
            rest = list(lines)
        finally:
            ledger.lanes, ledger.factory = saved
    assert any("database_unavailable" in line for line in rest), rest[-2:]
    assert att.charged(lane) == 0
    voucher = _voucher_hash(paid, header)
    assert any("NOT recorded" in r.getMessage() and voucher in r.getMessage() for r in caplog.records)
    assert att.post(body, header).status_code == 409  # and never a second generation


# --- 2. every accepted value fits the database ---------------------------------------------------
def test_a_deadline_the_database_cannot_store_is_refused_before_any_work(paid: PaidNode) -> None:
    att, lane = _attacker(paid), 105
    body = att.body(max_tokens=8)
    h = decode_payment_header(att.header(body, lane))
    v = Voucher(h.payer, h.node, h.lane, h.cumulative, h.request_hash, 2**63)
    far = PaymentHeader(h.payer, h.node, h.lane, h.cumulative, h.request_hash, 2**63,
                        sign_voucher(att.payer.key, v, att.payer.info.domain)).encode()
    for _ in range(2):
        resp = att.post(body, far)
        assert resp.status_code == 400 and "deadline" in resp.json()["error"]["message"]
    assert att.charged(lane) == 0


# --- 4. one escrow, one spend --------------------------------------------------------------------
def test_no_generation_outlives_its_hold_and_the_cut_answer_is_charged(paid: PaidNode) -> None:
    att, lane = _attacker(paid), 106
    svc = paid.local.services
    assert svc is not None
    saved, svc.generation.max_generation_s = getattr(svc.generation, "max_generation_s", None), 0.3
    try:
        body = att.body()
        resp = att.post(body, att.header(body, lane))
    finally:
        svc.generation.max_generation_s = saved
    assert resp.status_code == 200, resp.text
    usage = resp.json()["usage"]
    assert 0 < usage["completion_tokens"] < 1_000 and resp.json()["choices"][0]["finish_reason"] == "length"
    assert att.charged(lane) == int(resp.json()["receipt"]["fee"])


def test_an_answer_cut_by_the_time_limit_without_stop_strings_holds_the_text_it_is_charged_for(
        paid: PaidNode) -> None:
    """Without stop strings, an answer that is not streamed is decoded only at its end; one cut short (the
    time limit, or a client that left) came back with no text at all, charged for every token it had."""
    att, lane = _attacker(paid), 111
    svc = paid.local.services
    assert svc is not None
    saved, svc.generation.max_generation_s = getattr(svc.generation, "max_generation_s", None), 0.3
    def body(max_tokens: int) -> bytes:
        return json.dumps({"model": att.model, "prompt": "the sea", "max_tokens": max_tokens,
                           "temperature": 0}).encode()

    try:
        cut = att.post(body(1_000), att.header(body(1_000), lane))
    finally:
        svc.generation.max_generation_s = saved
    assert cut.status_code == 200, cut.text
    choice, usage = cut.json()["choices"][0], cut.json()["usage"]
    assert choice["finish_reason"] == "length" and 0 < usage["completion_tokens"] < 1_000
    assert att.charged(lane) == int(cut.json()["receipt"]["fee"])
    n = usage["completion_tokens"]
    whole = att.post(body(n), att.header(body(n), lane))  # the same tokens, greedy, run to their end
    assert whole.status_code == 200 and whole.json()["usage"]["completion_tokens"] == n
    assert choice["text"] == whole.json()["choices"][0]["text"] != "", "the cut answer lost the text it was charged for"


def test_an_answer_of_one_unfinished_character_is_charged_for_its_prompt_only(paid: PaidNode) -> None:
    """One token, the first byte of a character (forced by logit_bias): nothing whole to send. Before, the
    answer was U+FFFD, charged as a token."""
    att, lane = _attacker(paid), 112
    svc = paid.local.services
    assert svc is not None
    first_byte = svc.engine.engine.tokenizer.convert_tokens_to_ids("\u00e4")  # byte E4 (of 中, E4 B8 AD)
    body = json.dumps({"model": att.model, "prompt": "the sea", "max_tokens": 1, "temperature": 0,
                       "logit_bias": {str(first_byte): 100}}).encode()
    resp = att.post(body, att.header(body, lane))
    assert resp.status_code == 200, resp.text
    answer = resp.json()
    assert answer["choices"][0]["text"] == "" and answer["usage"]["completion_tokens"] == 0
    fee = svc.payments.pricing.fee(answer["usage"]["prompt_tokens"], 0)
    assert int(answer["receipt"]["fee"]) == fee == att.charged(lane)


def test_no_stream_outlives_its_hold_and_the_cut_stream_is_charged(paid: PaidNode) -> None:
    att, lane = _attacker(paid), 108
    svc = paid.local.services
    assert svc is not None
    saved, svc.generation.max_generation_s = getattr(svc.generation, "max_generation_s", None), 0.3
    try:
        body = att.body(stream=True)
        status, text, events = att.stream_text(body, att.header(body, lane))
    finally:
        svc.generation.max_generation_s = saved
    assert status == 200 and text
    last = events[-1]
    assert last["choices"][0]["finish_reason"] == "length" and 0 < last["receipt"]["completionTokens"] < 1_000
    assert att.charged(lane) == int(last["receipt"]["fee"])


# --- 7. one voucher, one generation at a time ----------------------------------------------------
def test_the_same_voucher_in_flight_twice_is_409_at_once_and_the_first_answer_completes(paid: PaidNode) -> None:
    att, lane = _attacker(paid), 107
    body = att.body(max_tokens=200, stream=True)
    header = att.header(body, lane)
    first = att.in_background(lambda: att.stream_text(body, header, timeout=15))
    _wait_held(paid, att, lane)
    started = time.monotonic()
    second = att.post(body, header, timeout=15)
    assert second.status_code == 409 and time.monotonic() - started < 2, second.text
    status, _text, events = first()
    assert status == 200 and events[-1]["receipt"]["completionTokens"] == 200
    assert att.charged(lane) == int(events[-1]["receipt"]["fee"])


def test_two_vouchers_raced_on_one_lane_over_the_same_charged_total_never_both_buy_an_answer(paid: PaidNode) -> None:
    """Both signed for `chargedTotal + maxFee`: if both were served, the chain would collect one voucher's
    cumulative for two answers. One is served; the other is refused (409 in flight, or 402 once the first
    was charged), on every backend, whichever lands first."""
    att, lane = _attacker(paid), 110
    for attempt in range(6):
        bodies = [att.body(prompt=f"the sea {attempt} {i}", max_tokens=8) for i in range(2)]
        # each for exactly what its body can cost, on the same charged total
        headers = [att.payer.payment_header(body, lane, "/v1/completions") for body in bodies]
        before, gate = att.charged(lane), threading.Barrier(2)
        joins = [att.in_background(lambda b=b, h=h, g=gate: _at_once(att, b, h, g))
                 for b, h in zip(bodies, headers, strict=True)]
        answers = [join() for join in joins]
        served = [a for a in answers if a.status_code == 200]
        assert len(served) == 1, [(a.status_code, a.text[:200]) for a in answers]
        refused = next(a for a in answers if a.status_code != 200)
        assert refused.status_code in (402, 409), refused.text
        assert att.charged(lane) == before + int(served[0].json()["receipt"]["fee"])


def _at_once(att: Attacker, body: bytes, header: str, gate: threading.Barrier) -> httpx.Response:
    gate.wait()
    return att.post(body, header)


# --- 5. one API process per SQLite file ----------------------------------------------------------
@pytest.mark.parametrize("paid", ["sqlite"], indirect=True)  # PostgreSQL serves many API processes
def test_a_second_api_process_on_the_same_sqlite_file_refuses_to_start(paid: PaidNode) -> None:
    settings = paid.local.settings
    assert settings.resolved_database_url().startswith("sqlite:")
    env = {**os.environ, **settings_env(settings), "LORANODE_PORT": str(free_port())}
    try:
        proc = subprocess.run([sys.executable, "-m", "node", "api"], env=env, capture_output=True, timeout=60)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError("a second API process started on the same SQLite file") from exc
    assert proc.returncode != 0
    assert b"another API process" in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-2000:]
