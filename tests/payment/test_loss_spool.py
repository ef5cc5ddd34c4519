"""A node fault with the database down: the write-off (nothing charged, the voucher spent, the loss
recorded) waits on local disk and survives the API process's restart. Before, the voucher was refused
only for the life of the process: restarted on the same host, the API let the same voucher take its own
old hold over and buy a second generation, and the loss was never recorded (SQLite, and PostgreSQL)."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from node.api.app import create_app
from node.db.loss import LossReason, losses
from node.db.session import make_engine, session_factory
from node.errors import VoucherConflict
from node.payment.ledger import Ledger
from node.payment.loss_spool import LossSpool
from node.payment.pricing import Pricing
from node.payment.service import Hold, PaymentService, Usage
from tests.payment.test_ledger import DOMAIN, NODE, _setup, _voucher

PRICING = Pricing(1, 2)


def _dead(db_url: str) -> sessionmaker[Session]:
    """Sessions on the same backend at an address where nothing answers."""
    if db_url.startswith("sqlite"):
        return session_factory(make_engine("sqlite:////nonexistent-folder/loranode.db"))
    return session_factory(make_engine("postgresql+psycopg://nobody@127.0.0.1:1/none?connect_timeout=1"))


def _api(factory: sessionmaker[Session], spool: Path) -> PaymentService:
    """One life of the API process (the same host: its holds carry the same instance name)."""
    return PaymentService(Ledger(factory, NODE), DOMAIN, NODE, PRICING, loss_spool=LossSpool(spool))


def test_a_write_off_the_database_refused_keeps_its_voucher_spent_across_a_restart(db_url: str,
                                                                                   tmp_path: Path) -> None:
    factory, spool = _setup(db_url, deposit=1_000), tmp_path / "unrecorded-losses"
    checked = _voucher(lane=0, cumulative=100)
    first = _api(factory, spool)
    hold = first.hold(checked, 100)
    assert isinstance(hold, Hold)
    first.ledger.factory = _dead(db_url)  # the database goes away while the stream fails
    first.write_off(hold, Usage(3, 4), LossReason.NODE_FAULT, "engine core died")

    down = _api(_dead(db_url), spool)  # restarted while the database is still down
    with pytest.raises(VoucherConflict):
        down.hold(checked, 100)
    with factory() as session:
        assert losses(session, NODE) == []

    second = _api(factory, spool)  # restarted with the database back
    with pytest.raises(VoucherConflict):
        second.hold(checked, 100)  # never a second generation
    with factory() as session:
        (loss,) = losses(session, NODE)
    assert (loss.amount, loss.reason, loss.voucher_hash) == (11, LossReason.NODE_FAULT, checked.digest_hex)
    assert LossSpool(spool).entries() == [], "recorded once: the spool is empty"
    assert second.ledger.channel(checked.payer, 0).charged_total == 0, "nothing charged"

    import shutil

    shutil.rmtree(spool, ignore_errors=True)
    with pytest.raises(VoucherConflict):  # spent in the database for good
        _api(factory, spool).hold(checked, 100)
    third = _api(factory, spool)
    third.flush_unrecorded()
    with factory() as session:
        assert len(losses(session, NODE)) == 1, "a write-off is recorded once"


def test_a_replica_that_started_before_the_write_off_refuses_its_voucher_too(db_url: str, tmp_path: Path) -> None:
    """Replicas share the data folder: one already running learns of another's write-off from the spool."""
    factory, spool = _setup(db_url, deposit=1_000), tmp_path / "unrecorded-losses"
    checked = _voucher(lane=0, cumulative=100)
    first, other = _api(factory, spool), _api(factory, spool)
    hold = first.hold(checked, 100)
    assert isinstance(hold, Hold)
    first.ledger.factory = _dead(db_url)
    first.write_off(hold, Usage(3, 4), LossReason.NODE_FAULT, "engine core died")
    with pytest.raises(VoucherConflict):
        other.hold(checked, 100)
    with factory() as session:
        assert [loss.voucher_hash for loss in losses(session, NODE)] == [checked.digest_hex]


def _quiet_app(payments: PaymentService, flush_interval_s: float) -> TestClient:
    """The API's app around `payments`, with no engine and no paid request coming."""
    engine = SimpleNamespace(engine=SimpleNamespace(start=lambda: None))
    svc = SimpleNamespace(engine=engine, payments=payments, idempotency_window_s=86_400.0, prune_interval_s=3_600.0,
                          loss_flush_interval_s=flush_interval_s, on_shutdown=[])
    return TestClient(create_app(svc))  # type: ignore[arg-type]


def _recorded(factory: sessionmaker[Session], within_s: float, count: int = 1) -> set[str]:
    """The vouchers of the losses recorded, once there are `count` of them or `within_s` has passed."""
    deadline = time.monotonic() + within_s
    while True:
        with factory() as session:
            found = {loss.voucher_hash for loss in losses(session, NODE)}
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def test_a_quiet_node_records_a_spooled_loss_at_start_and_once_the_database_is_back(db_url: str,
                                                                                   tmp_path: Path) -> None:
    """Before, the spool was moved only at the next paid request: a node nobody paid after its database
    came back never recorded the loss (and the settlement's books missed it)."""
    factory, spool = _setup(db_url, deposit=1_000), tmp_path / "unrecorded-losses"
    checked = _voucher(lane=0, cumulative=100)
    first = _api(factory, spool)
    hold = first.hold(checked, 100)
    assert isinstance(hold, Hold)
    first.ledger.factory = _dead(db_url)
    first.write_off(hold, Usage(3, 4), LossReason.NODE_FAULT, "engine core died")

    restarted = _api(_dead(db_url), spool)  # starts while the database is still down
    with _quiet_app(restarted, flush_interval_s=0.05):
        assert _recorded(factory, within_s=0.5) == set()
        restarted.ledger.factory = factory  # the database is back; no request comes
        assert _recorded(factory, within_s=5.0) == {checked.digest_hex}
    assert LossSpool(spool).entries() == []

    again = _voucher(lane=1, cumulative=100)  # a node restarted with the database up records it at start
    second = _api(factory, spool)
    hold = second.hold(again, 100)
    assert isinstance(hold, Hold)
    second.ledger.factory = _dead(db_url)
    second.write_off(hold, Usage(3, 4), LossReason.NODE_FAULT, "engine core died")
    with _quiet_app(_api(factory, spool), flush_interval_s=3_600.0):
        assert _recorded(factory, within_s=5.0, count=2) == {checked.digest_hex, again.digest_hex}
