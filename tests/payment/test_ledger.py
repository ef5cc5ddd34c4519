"""Lanes, holds, charges and receipts in the database (SQLite, and PostgreSQL in CI)."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from node.chain.events import ChainEvent
from node.chain.mirror import Mirror
from node.db.models import Lane, Receipt
from node.db.models import Voucher as VoucherRow
from node.db.session import make_engine, session_factory, upgrade
from node.errors import DatabaseUnavailable, InsufficientEscrow, VoucherConflict
from node.payment.ledger import Ledger
from node.payment.voucher_check import CheckedVoucher, check_voucher
from node.protocol.eip712 import Domain
from node.protocol.receipt import Receipt as ReceiptFields
from node.protocol.receipt import SignedReceipt, adapter_id_bytes
from node.protocol.voucher import PaymentHeader, Voucher, request_hash, sign_voucher

PAYER_KEY = "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d"
PAYER = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"
NODE = "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"
DOMAIN = Domain(chain_id=31337, verifying_contract="0x5FbDB2315678afecb367f032d93F642f64180aa3")
DEADLINE = 4_000_000_000


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def _voucher(lane: int, cumulative: int, body: bytes = b"{}") -> CheckedVoucher:
    v = Voucher(PAYER, NODE, lane, cumulative, request_hash(body), DEADLINE)
    header = PaymentHeader(PAYER, NODE, lane, cumulative, v.request_hash, DEADLINE, sign_voucher(PAYER_KEY, v, DOMAIN))
    return check_voucher(header, body, domain=DOMAIN, node=NODE)


def _setup(db_url: str, deposit: int) -> sessionmaker[Session]:
    upgrade(db_url)
    factory = session_factory(make_engine(db_url))
    ev = ChainEvent(31337, 1, "0x" + "01" * 32, "0x" + "02" * 32, 0, "0x" + "03" * 20, "Deposited",
                    {"payer": PAYER.lower(), "node": NODE.lower(), "amount": deposit})
    with factory.begin() as s:
        Mirror(31337).ingest(s, [ev], final_block=1)  # a final deposit: spendable
    return factory


def _receipt(n: int, fee: int) -> SignedReceipt:
    receipt = ReceiptFields(bytes(32), adapter_id_bytes(1), 1, b"\xab" * 32, 3, 4, fee, b"\xcd" * 32, 1)
    return SignedReceipt(receipt, n.to_bytes(32, "big"), b"\x11" * 65, NODE)


def _body(total: int) -> dict[str, Any]:
    return {"charged": total}


def test_hold_charge_and_receipt_in_one_go(db_url: str) -> None:
    factory = _setup(db_url, deposit=1_000)
    ledger = Ledger(factory, NODE)
    checked = _voucher(lane=0, cumulative=100)
    hold = ledger.reserve(checked, max_fee=100)
    total, body = ledger.commit(hold, checked, 60, _receipt(1, 60), _body)
    assert (total, body) == (60, {"charged": 60})
    assert ledger.stored_response(checked.digest_hex) == {"charged": 60}
    channel = ledger.channel(PAYER, 0)
    assert (channel.charged_total, channel.last_cumulative, channel.spendable) == (60, 100, 940)
    with factory() as s:
        receipt = s.scalars(select(Receipt)).one()
        assert receipt.voucher_hash == checked.digest_hex and receipt.fee == 60
        assert s.get(VoucherRow, checked.digest_hex).charged_total == 60


def test_the_next_voucher_signs_on_top_of_the_charged_total(db_url: str) -> None:
    ledger = Ledger(_setup(db_url, deposit=1_000), NODE)
    first = _voucher(0, 100)
    ledger.commit(ledger.reserve(first, 100), first, 60, _receipt(1, 60), _body)
    with pytest.raises(InsufficientEscrow, match="does not cover") as err:
        ledger.reserve(_voucher(0, 150, b"2"), max_fee=100)  # 60 charged + 100 max fee > 150
    assert err.value.facts["needed"] == "160"
    ledger.reserve(_voucher(0, 160, b"3"), max_fee=100)


def test_replays_stale_vouchers_and_busy_lanes_are_409(db_url: str) -> None:
    clock = Clock()
    ledger = Ledger(_setup(db_url, deposit=1_000), NODE, clock=clock)
    first = _voucher(0, 100)
    ledger.commit(ledger.reserve(first, 100), first, 100, _receipt(1, 100), _body)
    assert ledger.reserve(first, 100) == {"charged": 100}  # served before: its response, no new hold
    clock.now += 3_600
    assert ledger.forget_responses(timedelta(seconds=1_800)) == 1
    with pytest.raises(VoucherConflict, match="already used"):  # past the window: refused, never re-served
        ledger.reserve(first, 100)
    with pytest.raises(VoucherConflict, match="stale"):
        ledger.reserve(_voucher(0, 99, b"x"), 0)
    ledger.reserve(_voucher(0, 300, b"y"), 100)
    with pytest.raises(VoucherConflict, match="in flight"):
        ledger.reserve(_voucher(0, 400, b"z"), 100)


def test_holds_on_other_lanes_count_against_the_escrow(db_url: str) -> None:
    ledger = Ledger(_setup(db_url, deposit=250), NODE)
    ledger.reserve(_voucher(0, 200), 200)
    with pytest.raises(InsufficientEscrow, match="not enough escrow") as err:
        ledger.reserve(_voucher(1, 200), 200)
    assert err.value.facts["spendable"] == 50
    ledger.reserve(_voucher(2, 50), 50)


def test_a_released_hold_charges_nothing(db_url: str) -> None:
    factory = _setup(db_url, deposit=100)
    ledger = Ledger(factory, NODE)
    checked = _voucher(0, 100)
    ledger.release(ledger.reserve(checked, 100))
    assert ledger.channel(PAYER, 0).charged_total == 0
    again = _voucher(0, 100, b"again")
    ledger.reserve(again, 100)  # the lane is free and the escrow whole again
    with factory() as s:
        assert s.scalars(select(Receipt)).all() == []


def test_an_expired_hold_is_taken_over_and_cannot_be_charged(db_url: str) -> None:
    clock = Clock()
    ledger = Ledger(_setup(db_url, deposit=1_000), NODE, reservation_ttl_s=60, clock=clock)
    crashed = _voucher(0, 100)
    stale_hold = ledger.reserve(crashed, 100)
    clock.now += 61
    fresh = _voucher(0, 100, b"fresh")
    ledger.reserve(fresh, 100)
    with pytest.raises(VoucherConflict, match="taken over"):
        ledger.commit(stale_hold, crashed, 100, _receipt(1, 100), _body)



def test_the_same_voucher_sent_again_takes_its_hold_over_and_is_charged_once(db_url: str) -> None:
    """Its first request died with the API process (SIGKILL): the retry needs no reservation_ttl_s wait."""
    ledger = Ledger(_setup(db_url, deposit=1_000), NODE)
    checked = _voucher(0, 100)
    orphan = ledger.reserve(checked, 100)  # the process that placed it is gone
    with pytest.raises(VoucherConflict, match="in flight"):
        ledger.reserve(_voucher(0, 200, b"other"), 100)  # another voucher still waits for the hold to end
    retry = ledger.reserve(checked, 100)
    assert ledger.commit(retry, checked, 70, _receipt(1, 70), _body) == (70, {"charged": 70})
    with pytest.raises(VoucherConflict, match="taken over"):  # had the first one lived on: nothing charged
        ledger.commit(orphan, checked, 70, _receipt(2, 70), _body)
    assert ledger.channel(PAYER, 0).charged_total == 70
    assert ledger.reserve(checked, 100) == {"charged": 70}

def test_concurrent_lanes_never_spend_more_than_the_escrow(db_url: str) -> None:
    factory = _setup(db_url, deposit=1_000)
    ledger = Ledger(factory, NODE)
    outcomes: list[str] = []
    lock = threading.Lock()

    def one(lane: int) -> None:
        checked = _voucher(lane, 300, f"{lane}".encode())
        try:
            hold = ledger.reserve(checked, 300)
            ledger.commit(hold, checked, 300, _receipt(lane + 1, 300), _body)
            result = "ok"
        except InsufficientEscrow:
            result = "402"
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=one, args=(lane,)) for lane in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count("ok") == 3 and outcomes.count("402") == 5
    with factory() as s:
        assert sum(r.charged_total for r in s.scalars(select(Lane))) == 900


# --- PostgreSQL only: the pipelined transactions of lane_pg.py, under failure -----------------------
def _backends(postgres_url: str, where: str) -> list[Any]:
    import psycopg

    dsn = postgres_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute("SELECT pid, state FROM pg_stat_activity WHERE datname = current_database() "
                            f"AND pid <> pg_backend_pid() AND {where}").fetchall()


def test_a_refused_hold_leaves_no_transaction_or_lock_behind(postgres_url: str) -> None:
    ledger = Ledger(_setup(postgres_url, deposit=100), NODE)
    with pytest.raises(InsufficientEscrow):
        ledger.reserve(_voucher(0, 500), 500)  # refused after the lock and the read, inside the pipeline
    with pytest.raises(InsufficientEscrow, match="does not cover"):
        ledger.reserve(_voucher(0, 50, b"x"), 100)  # cumulative below chargedTotal + maxFee
    assert _backends(postgres_url, "state <> 'idle'") == []
    import psycopg

    with psycopg.connect(postgres_url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        assert conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'").fetchone() == (0,)
    other = Ledger(session_factory(make_engine(postgres_url)), NODE)  # another API process: not blocked
    other.reserve(_voucher(1, 100), 100)


def test_a_killed_connection_is_a_503_and_the_next_request_is_served(postgres_url: str) -> None:
    ledger = Ledger(_setup(postgres_url, deposit=1_000), NODE)
    first = _voucher(0, 100)
    ledger.commit(ledger.reserve(first, 100), first, 10, _receipt(1, 10), _body)
    import psycopg

    with psycopg.connect(postgres_url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                     "WHERE datname = current_database() AND pid <> pg_backend_pid()")
    second = _voucher(0, 200, b"2")
    with pytest.raises(DatabaseUnavailable):
        ledger.reserve(second, 100)  # the pooled connection died under it: nothing was held
    hold = ledger.reserve(second, 100)  # the pool was rebuilt
    assert ledger.commit(hold, second, 20, _receipt(2, 20), _body)[0] == 30


def test_a_hold_waits_for_the_payer_lock_and_reads_what_was_committed_under_it(postgres_url: str) -> None:
    """Another API process holds the payer's lock while it places a hold on lane 1 (900 of the 1,000 in
    escrow): a hold on lane 0 waits for that lock, then reads the lanes as they are once it is given
    back, so the two can never spend more than the escrow together (the lock comes before the read)."""
    import psycopg

    from node.payment.lane_pg import hold_lock_key

    ledger = Ledger(_setup(postgres_url, deposit=1_000), NODE)
    outcome: list[str] = []

    def hold() -> None:
        try:
            ledger.reserve(_voucher(0, 300), 300)
            outcome.append("held")
        except InsufficientEscrow:
            outcome.append("402")

    with psycopg.connect(postgres_url.replace("postgresql+psycopg://", "postgresql://")) as other:
        other.execute("SELECT pg_advisory_xact_lock(%s)", (hold_lock_key(PAYER.lower(), NODE.lower()),))
        other.execute("INSERT INTO lanes (payer, node, lane, charged_total, last_cumulative, reserved, "
                      "reserved_voucher_hash, reserved_at, reserved_by, updated_at) "
                      "VALUES (%s, %s, 1, 0, 0, 900, %s, now(), 'other', now())",
                      (PAYER.lower(), NODE.lower(), "0x" + "77" * 32))
        waiting = threading.Thread(target=hold)
        waiting.start()
        waiting.join(timeout=1.0)
        assert waiting.is_alive() and outcome == []  # it waits for the lock
        other.commit()
    waiting.join(timeout=30)
    assert outcome == ["402"]
