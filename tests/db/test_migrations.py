"""The migrations build the models' schema from empty, tear it down, and build it again."""

from __future__ import annotations

from datetime import UTC, datetime

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, bindparam, inspect, text
from sqlalchemy.orm import Session

from node.db.models import Base
from node.db.payment_models import EscrowAccount
from node.db.session import downgrade, make_engine, upgrade
from node.db.types import Amount, UTCDateTime


def _schema_diff(engine: Engine) -> list[object]:
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(ctx, Base.metadata))


def _tables(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names()) - {"alembic_version"}


def test_upgrade_downgrade_upgrade_matches_the_models(db_url: str) -> None:
    engine = make_engine(db_url, pooled=False)
    upgrade(db_url)
    assert _tables(engine) == set(Base.metadata.tables)
    assert _schema_diff(engine) == []

    downgrade(db_url, "base")
    assert _tables(engine) == set()

    upgrade(db_url)
    assert _schema_diff(engine) == []
    engine.dispose()


def test_the_comparison_catches_a_model_the_migrations_lack(db_url: str) -> None:
    from sqlalchemy import Column, Integer, MetaData, Table

    engine = make_engine(db_url, pooled=False)
    upgrade(db_url)
    extra = MetaData()
    for table in Base.metadata.tables.values():
        table.to_metadata(extra)
    Table("not_migrated", extra, Column("id", Integer, primary_key=True))
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), extra)
    assert [d[0] for d in diff] == ["add_table"]
    engine.dispose()



def test_an_escrow_account_mirrored_before_0012_keeps_its_thaw_as_final(db_url: str) -> None:
    """Rows mirrored before `final_thawing` existed take their `thawing` (exact for every final row)."""
    engine = make_engine(db_url, pooled=False)
    upgrade(db_url, "0011")
    payer, node = "0x" + "0c" * 20, "0x" + "0d" * 20
    insert = text("INSERT INTO escrow_accounts (payer, node, balance, thawing, deposited, withdrawn, collected, "
                  "pending_deposits, thaw_end_at, block_number, updated_block, is_final) "
                  "VALUES (:payer, :node, :balance, :thawing, :balance, :zero, :zero, :zero, :end, 1, 2, true)")
    amounts = [bindparam(name, type_=Amount()) for name in ("balance", "thawing", "zero")]
    amounts.append(bindparam("end", type_=UTCDateTime()))
    with engine.begin() as conn:
        conn.execute(insert.bindparams(*amounts), {"payer": payer, "node": node, "balance": 1_000, "thawing": 600,
                                                   "zero": 0, "end": datetime(2027, 1, 1, tzinfo=UTC)})
    upgrade(db_url)
    with Session(engine) as s:
        row = s.get(EscrowAccount, (payer, node))
        assert row is not None and (row.thawing, row.final_thawing) == (600, 600)
        assert row.final_thaw_end_at == row.thaw_end_at is not None
    engine.dispose()
