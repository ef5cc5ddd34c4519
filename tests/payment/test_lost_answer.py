"""A charge committed by PostgreSQL whose answer never reached the API process (the connection dropped after
the COMMIT, before its result was read): the process sees a DatabaseUnavailable, and the generation's caller
writes the voucher off as undelivered-uncharged (node/api/generation.py). The lane, meanwhile, is the
other replica's to serve. Nothing of what was charged may be recorded as lost as well."""

from __future__ import annotations

from sqlalchemy import select

from node.db.loss import LossReason
from node.db.models import Loss
from node.payment.ledger import Ledger
from tests.payment.test_ledger import NODE, PAYER, _body, _receipt, _setup, _voucher


def test_a_write_off_after_a_charge_that_went_through_records_no_loss_and_keeps_the_charge(db_url: str) -> None:
    factory = _setup(db_url, deposit=1_000)
    a = Ledger(factory, NODE, instance="a:8000")
    b = Ledger(factory, NODE, instance="b:8000")
    checked = _voucher(0, 100)
    held = a.reserve(checked, 100)
    a.commit(held, checked, 60, _receipt(1, 60), _body)  # committed; replica A never read the answer
    following = _voucher(0, 160, b"next")
    b.commit(b.reserve(following, 100), following, 50, _receipt(2, 50), _body)  # B serves the lane's next one
    a.write_off(held, checked, 60, LossReason.DELIVERED_UNCHARGED, "database_unavailable: the charge's answer")
    with factory() as s:
        assert s.scalars(select(Loss)).all() == [], "a charged voucher recorded as a loss as well"
    assert a.channel(PAYER, 0).charged_total == 110
    assert a.reserve(checked, 100) == {"charged": 60}  # its retry gets the answer it paid for
