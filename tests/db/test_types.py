"""Chain values survive the database exactly: uint256 amounts, lower-cased addresses, UTC times."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import select
from sqlalchemy.exc import StatementError

from node.db.payment_models import EscrowAccount
from node.db.session import make_engine, session_factory, upgrade

PAYER = "0x" + "Ab" * 20
NODE = "0x" + "cd" * 20


def _account(balance: int, payer: str = PAYER) -> EscrowAccount:
    return EscrowAccount(payer=payer, node=NODE, balance=balance, thawing=0, deposited=balance, withdrawn=0,
                         collected=0, block_number=1, updated_block=1, is_final=False,
                         thaw_end_at=datetime(2026, 1, 1, 12, tzinfo=timezone(timedelta(hours=2))))


def test_amounts_addresses_and_times_round_trip_exactly(db_url: str) -> None:
    upgrade(db_url)
    factory = session_factory(make_engine(db_url))
    top = 2**256 - 1
    with factory.begin() as s:
        s.add(_account(top))
        s.add(_account(7, payer="0x" + "01" * 20))
    with factory() as s:
        rows = {a.payer: a for a in s.scalars(select(EscrowAccount))}
        big = s.scalars(select(EscrowAccount).where(EscrowAccount.balance > 10**70)).one()
    assert rows[PAYER.lower()].balance == top and isinstance(rows[PAYER.lower()].balance, int)
    assert big.payer == PAYER.lower()
    assert rows[PAYER.lower()].thaw_end_at == datetime(2026, 1, 1, 10, tzinfo=UTC)


@pytest.mark.parametrize("bad", [-1, 2**260, 1.5])
def test_amounts_refuse_what_is_not_a_uint(db_url: str, bad: object) -> None:
    upgrade(db_url)
    factory = session_factory(make_engine(db_url))
    with pytest.raises(StatementError, match="amount must be"), factory.begin() as s:
        s.add(_account(bad))  # type: ignore[arg-type]
        s.flush()


def test_malformed_addresses_are_refused(db_url: str) -> None:
    upgrade(db_url)
    factory = session_factory(make_engine(db_url))
    with pytest.raises(StatementError, match="address"), factory.begin() as s:
        s.add(_account(1, payer="0x1234"))
        s.flush()


def test_sqlite_runs_in_wal_mode_with_foreign_keys(tmp_path: object) -> None:
    from sqlalchemy import text

    engine = make_engine(f"sqlite:///{tmp_path}/wal.db")
    with engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
