"""Insert-or-update and insert-or-ignore of many rows, in the dialect's own syntax (SQLite and
PostgreSQL share `ON CONFLICT`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

CHUNK = 1000


def _insert(session: Session, table: Table) -> Any:
    return (postgresql.insert(table) if session.get_bind().dialect.name == "postgresql"
            else sqlite.insert(table))


def upsert(session: Session, table: Table, rows: Sequence[dict[str, Any]]) -> None:
    """Insert `rows`; a row whose primary key exists replaces the stored values."""
    if not rows:
        return
    keys = [c.name for c in table.primary_key.columns]
    stmt = _insert(session, table)
    stmt = stmt.on_conflict_do_update(
        index_elements=keys, set_={c: stmt.excluded[c] for c in rows[0] if c not in keys})
    for i in range(0, len(rows), CHUNK):
        session.execute(stmt, list(rows[i:i + CHUNK]))


def insert_new(session: Session, table: Table, rows: Sequence[dict[str, Any]], unique: Sequence[str],
               returning: Sequence[str]) -> list[tuple[Any, ...]]:
    """Insert the rows whose `unique` columns are not stored yet; return `returning` of those inserted."""
    if not rows:
        return []
    stmt = _insert(session, table).on_conflict_do_nothing(index_elements=list(unique))
    stmt = stmt.returning(*(table.c[c] for c in returning))
    out: list[tuple[Any, ...]] = []
    for i in range(0, len(rows), CHUNK):
        out.extend(tuple(r) for r in session.execute(stmt, list(rows[i:i + CHUNK])))
    return out
