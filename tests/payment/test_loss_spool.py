"""A node fault with the database down: the write-off (nothing charged, the voucher spent, the loss
recorded) waits on local disk and survives the API process's restart. Before, the voucher was refused
only for the life of the process: restarted on the same host, the API let the same voucher take its own
old hold over and buy a second generation, and the loss was never recorded (SQLite, and PostgreSQL)."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

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
