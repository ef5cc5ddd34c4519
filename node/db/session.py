"""Engines, sessions and schema migration.

`make_engine(url)` gives SQLite WAL mode, foreign keys and a busy timeout (the API, the indexer and
the worker share one file in `loranode dev`), or a PostgreSQL pool that pings a connection idle for
more than `PING_AFTER_IDLE_S` before handing it out (a ping is a round trip, and the paid path checks
out a connection twice per request: pinging busy connections would double its round trips).
`upgrade(url)` runs the Alembic migrations in `migrations/` up to head.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import ExceptionContext
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import ConnectionPoolEntry, NullPool, PoolProxiedConnection

from node.db.types import sqlite_amount_functions

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
SQLITE_BUSY_TIMEOUT_MS = 30_000
PING_AFTER_IDLE_S = 1.0


def make_engine(url: str, *, echo: bool = False, pool_size: int = 10, pooled: bool = True) -> Engine:
    """An engine for `url` (sqlite:///path or postgresql+psycopg://...); `pooled=False` opens a
    connection per use (one-shot tools such as migrations)."""
    if url.startswith("sqlite"):
        args = {"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}
        engine = create_engine(url, echo=echo, poolclass=None if pooled else NullPool, connect_args=args)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    if not pooled:
        return create_engine(url, echo=echo, poolclass=NullPool)
    engine = create_engine(url, echo=echo, pool_size=pool_size, max_overflow=pool_size)
    _ping_idle_connections(engine)
    return engine


def _ping_idle_connections(engine: Engine) -> None:
    """`pool_pre_ping`, for connections idle longer than PING_AFTER_IDLE_S only. A dead one is
    replaced before use (the pool retries on DisconnectionError); a server restart within the last
    second is met by the statement instead, which fails as a disconnect (503) and resets the pool."""
    dialect = engine.dialect

    @event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_conn: Any, record: ConnectionPoolEntry) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "handle_error")
    def _server_gone(ctx: ExceptionContext) -> None:
        # psycopg can meet the server's "terminating connection" while still sending the statement: its
        # error then has no SQLSTATE ("sending query failed: ...; another command is already in
        # progress") and the dialect does not call it a disconnect, so the pool kept the dead
        # connection for the next request. An OperationalError without a server SQLSTATE, or with a
        # connection-exception / operator-intervention one (08, 57P), is one.
        orig = ctx.original_exception
        state = getattr(orig, "sqlstate", None)
        if (isinstance(orig, dialect.loaded_dbapi.OperationalError)
                and (state is None or str(state).startswith(("08", "57P")))):
            ctx.is_disconnect = True

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_conn: Any, record: ConnectionPoolEntry, _proxy: PoolProxiedConnection) -> None:
        idle_since = record.info.get("idle_since")
        if idle_since is None or time.monotonic() - idle_since < PING_AFTER_IDLE_S:
            return  # a new connection, or one that answered a moment ago
        try:
            dialect.do_ping(dbapi_conn)
        except dialect.loaded_dbapi.Error as exc:
            if dialect.is_disconnect(exc, dbapi_conn, None):
                raise DisconnectionError(str(exc)) from exc
            raise


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cur.close()
    sqlite_amount_functions(dbapi_conn)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded values after commit (rows are read, then handed on as values)."""
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work: commit on success, roll back on any error."""
    with factory() as session, session.begin():
        yield session


def alembic_config(url: str) -> Any:
    from alembic.config import Config

    cfg = Config(str(REPO_ROOT / "alembic.ini")) if (REPO_ROOT / "alembic.ini").exists() else Config()
    cfg.set_main_option("script_location", str(REPO_ROOT / "migrations"))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Migrate the database at `url` to `revision` (creating the schema from empty)."""
    from alembic import command

    log.info("migrating database to %s", revision)
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str = "base") -> None:
    from alembic import command

    command.downgrade(alembic_config(url), revision)
