"""Insert-or-update and insert-or-ignore of many rows, in the dialect's own syntax (SQLite and
PostgreSQL share `ON CONFLICT`).

On PostgreSQL a large batch goes through COPY into a temporary table and one
`INSERT ... SELECT ... ON CONFLICT`: a multi-row VALUES statement with tens of thousands of
parameters spends most of its time being built and parsed on the client.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

CHUNK = 1000
COPY_MIN_ROWS = 200


def _insert(session: Session, table: Table) -> Any:
    return (postgresql.insert(table) if session.get_bind().dialect.name == "postgresql"
            else sqlite.insert(table))


def _is_postgres(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def upsert(session: Session, table: Table, rows: Sequence[dict[str, Any]]) -> None:
    """Insert `rows`; a row whose primary key exists replaces the stored values."""
    if not rows:
        return
    keys = [c.name for c in table.primary_key.columns]
    if _is_postgres(session) and len(rows) >= COPY_MIN_ROWS:
        sets = ", ".join(f'"{c}" = EXCLUDED."{c}"' for c in rows[0] if c not in keys)
        _copy_insert(session, table, rows, f"({_names(keys)}) DO UPDATE SET {sets}", ())
        return
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
    if _is_postgres(session) and len(rows) >= COPY_MIN_ROWS:
        return _copy_insert(session, table, rows, f"({_names(unique)}) DO NOTHING", returning)
    stmt = _insert(session, table).on_conflict_do_nothing(index_elements=list(unique))
    stmt = stmt.returning(*(table.c[c] for c in returning))
    out: list[tuple[Any, ...]] = []
    for i in range(0, len(rows), CHUNK):
        out.extend(tuple(r) for r in session.execute(stmt, list(rows[i:i + CHUNK])))
    return out


def _names(cols: Sequence[str]) -> str:
    return ", ".join(f'"{c}"' for c in cols)


def _copy_insert(session: Session, table: Table, rows: Sequence[dict[str, Any]], on_conflict: str,
                 returning: Sequence[str]) -> list[tuple[Any, ...]]:
    """COPY `rows` into a temporary table, then INSERT ... SELECT ... ON CONFLICT {on_conflict}.
    Values pass through each column type's bind processing, as a normal insert would."""
    cols = list(rows[0])
    dialect = session.get_bind().dialect
    procs = [table.c[c].type._cached_bind_processor(dialect) for c in cols]
    tmp = f"_load_{table.name}"
    conn = session.connection().connection.driver_connection
    assert conn is not None
    with conn.cursor() as cur:
        cur.execute(f'CREATE TEMP TABLE IF NOT EXISTS "{tmp}" ON COMMIT DROP AS '
                    f'SELECT {_names(cols)} FROM "{table.name}" WITH NO DATA')
        cur.execute(f'TRUNCATE "{tmp}"')
        with cur.copy(f'COPY "{tmp}" ({_names(cols)}) FROM STDIN') as copy:
            for row in rows:
                copy.write_row([p(row[c]) if p else row[c] for c, p in zip(cols, procs, strict=True)])
        ret = f" RETURNING {_names(returning)}" if returning else ""
        cur.execute(f'INSERT INTO "{table.name}" ({_names(cols)}) SELECT {_names(cols)} FROM "{tmp}" '
                    f"ON CONFLICT {on_conflict}{ret}")
        return [tuple(r) for r in cur.fetchall()] if returning else []
