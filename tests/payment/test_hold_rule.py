"""The hold rule is written twice, in Python (hold_rule.refusal) and in the one SQL statement that places
a hold on PostgreSQL (lane_pg.py): on random lanes, holds and escrows, the database places a hold
exactly when the Python rule allows it (SQLite decides with the Python rule itself)."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy.orm import Session, sessionmaker

import node.payment.ledger as ledger_module
from node.chain.events import ChainEvent
from node.chain.mirror import Mirror
from node.db.models import Lane
from node.db.session import make_engine, session_factory, upgrade
from node.errors import InsufficientEscrow
from node.payment.hold_rule import HoldRequest, refusal
from node.payment.lane_pg import PipelinedLanes
from node.payment.lane_sqlite import SQLiteLanes
from node.payment.ledger import Ledger
from tests.payment.test_ledger import NODE as LEDGER_NODE
from tests.payment.test_ledger import _setup, _voucher

NODE = "0x" + "ab" * 20
NOW = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)
TTL = timedelta(seconds=600)
OWNERS = ("api-a", "api-b")


def _event(block: int, tx: int, name: str, **args: object) -> ChainEvent:
    return ChainEvent(31337, block, "0x" + f"{block:064x}", "0x" + f"{tx:064x}", 0, "0x" + "03" * 20, name,
                      {"node": NODE, **args})


def _deposits(factory: sessionmaker[Session], payers: list[str], rng: random.Random) -> None:
    """Each payer a final deposit, some a second one not final yet (block 9 while block 1 is final); some
    a thaw: final, cancelled or lowered in block 9 (not final), or started in block 9."""
    events = []
    for i, payer in enumerate(payers):
        for block, amount in ((1, rng.choice((0, 50, 300, 1_000))), (9, rng.choice((0, 0, 200)))):
            if amount:
                events.append(_event(block, i * 16 + block, "Deposited", payer=payer, amount=amount))
        thaws = rng.choice(((), ((1, 40),), ((1, 250), (9, 0)), ((1, 250), (9, 30)), ((9, 40),)))
        for block, amount in thaws:
            events.append(_event(block, i * 16 + block + 2, "ThawStarted", payer=payer, amount=amount,
                                 thawEndAt=block * 100 if amount else 0))
    with factory.begin() as s:
        Mirror(31337).ingest(s, events, final_block=1)


def _lanes(payer: str, rng: random.Random) -> list[Lane]:
    """A few lanes: charged, held (live or expired, by either process) or free."""
    rows = []
    for lane in range(rng.randint(0, 3)):
        charged = rng.choice((0, 40, 200))
        held = rng.random() < 0.6
        rows.append(Lane(payer=payer, node=NODE, lane=lane, charged_total=charged,
                         last_cumulative=charged + rng.choice((0, 0, 60)), reserved=rng.choice((0, 100)) if held else 0,
                         reserved_voucher_hash=("0x" + f"{lane + 1:064x}") if held else None,
                         reserved_at=NOW - rng.choice((timedelta(seconds=5), TTL, TTL * 2)) if held else None,
                         reserved_by=rng.choice(OWNERS) if held else None, updated_at=NOW))
    return rows


def _request(payer: str, rng: random.Random) -> HoldRequest:
    lane = rng.randint(0, 3)
    voucher = "0x" + f"{rng.choice((lane + 1, 99)):064x}"  # the lane's held voucher again, or a new one
    return HoldRequest(payer, NODE, lane, voucher, rng.choice((0, 100, 240, 400, 2_000)), rng.choice((0, 60, 100, 500)),
                       NOW, NOW - TTL, rng.choice(OWNERS), is_fresh=rng.random() < 0.9)


def test_the_database_holds_exactly_when_the_rule_allows(db_url: str) -> None:
    upgrade(db_url)
    engine = make_engine(db_url)
    factory = session_factory(engine)
    lanes = SQLiteLanes(engine) if engine.dialect.name == "sqlite" else PipelinedLanes(engine)
    rng = random.Random(20)
    payers = ["0x" + f"{i:040x}" for i in range(1, 121)]
    _deposits(factory, payers, rng)
    with factory.begin() as s:
        for payer in payers:
            s.add_all(_lanes(payer, rng))
    seen: dict[str, int] = {}
    for payer in payers:
        request = _request(payer, rng)
        view, is_held = lanes.hold(request)
        why = refusal(view, request)
        allowed = not view.is_used and request.is_fresh and why is None
        assert is_held == allowed, (request, view, why)
        with factory() as s:
            row = s.get(Lane, (payer, NODE, request.lane))
            placed = row is not None and (row.reserved_voucher_hash, row.reserved_by, row.reserved) == (
                request.voucher_hash, request.owner, request.max_fee) and row.reserved_at == NOW
        assert placed == allowed
        kind = "held" if allowed else "stale" if not request.is_fresh else type(why).__name__
        if why is not None and "not final" in str(why) and "thaw" in str(why):
            kind = "ThawCancelNotFinal"
        seen[kind] = seen.get(kind, 0) + 1
    # every outcome, many times: held, too late, and each of the rule's refusals
    assert set(seen) == {"held", "stale", "VoucherConflict", "InsufficientEscrow", "DepositNotFinal",
                         "ThawCancelNotFinal"}, seen
    assert min(seen.values()) >= 5, seen


def test_a_hold_the_ledger_refuses_is_given_back(db_url: str, monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """Were the two copies of the rule ever to disagree (the database held, the ledger's rule refuses),
    the ledger raises the refusal and the hold is released: nothing stays reserved against the escrow."""
    factory = _setup(db_url, deposit=1_000)
    ledger = Ledger(factory, LEDGER_NODE)
    refused = InsufficientEscrow("refused by the ledger's copy of the rule")
    monkeypatch.setattr(ledger_module, "refusal", lambda view, request: refused)
    with pytest.raises(InsufficientEscrow, match="ledger's copy"):
        ledger.reserve(_voucher(0, 100), 100)
    assert "hold rule mismatch" in caplog.text
    with factory() as s:
        assert [(row.reserved, row.reserved_voucher_hash) for row in s.query(Lane).all()] == [(0, None)]
