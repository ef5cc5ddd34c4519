"""Recording losses: what `record_loss` writes is what the node later reads back."""

from __future__ import annotations

from sqlalchemy.orm import Session, sessionmaker

from node.db.loss import LossReason, LossRecord, losses, record_loss
from node.db.session import make_engine, session_factory, upgrade

PAYER, NODE = "0x" + "aa" * 20, "0x" + "bb" * 20


def _db(db_url: str) -> sessionmaker[Session]:
    upgrade(db_url)
    return session_factory(make_engine(db_url))


def test_a_loss_recorded_as_recovered_stays_recovered(db_url: str) -> None:
    """A loss written with the epoch that collected it is no longer lost: `loranode settle losses` must not
    list it as owed (the old code dropped `recovered_epoch_id`, so it came back as lost)."""
    factory = _db(db_url)
    with factory.begin() as s:
        record_loss(s, LossRecord(NODE, PAYER, 0, 700, LossReason.VOUCHER_EXPIRED, "0x" + "01" * 32, epoch_id=3,
                                  recovered_epoch_id=4))
        record_loss(s, LossRecord(NODE, PAYER, 1, 50, LossReason.ESCROW_SHORT, "0x" + "02" * 32, epoch_id=3))
    with factory() as s:
        assert [(r.lane, r.amount) for r in losses(s, NODE, PAYER)] == [(1, 50)]
        assert [(r.lane, r.recovered_epoch_id) for r in losses(s, NODE, PAYER, include_recovered=True)] == [
            (0, 4), (1, None)]
