"""The PostgreSQL pool: idle connections are pinged before use, busy ones are not (a round trip each)."""

from __future__ import annotations

import psycopg
import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import OperationalError

from node.db import session
from node.db.session import make_engine


def _backend_pid(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())


def _terminate(url: str, pid: int) -> None:
    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(%s)", [pid])


def test_an_idle_connection_the_server_dropped_is_replaced_before_use(postgres_url: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(session, "PING_AFTER_IDLE_S", 0.0)  # every pooled connection counts as idle
    engine = make_engine(postgres_url, pool_size=1)
    first = _backend_pid(engine)
    _terminate(postgres_url, first)
    assert _backend_pid(engine) != first  # the ping found it dead: a fresh connection, no error


def test_a_connection_used_a_moment_ago_is_not_pinged_and_the_pool_recovers_after_one_error(
        postgres_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(session, "PING_AFTER_IDLE_S", 60.0)  # every pooled connection counts as busy
    engine = make_engine(postgres_url, pool_size=1)
    first = _backend_pid(engine)
    _terminate(postgres_url, first)
    with pytest.raises(OperationalError) as err:  # not pinged: the statement meets the dead connection
        _backend_pid(engine)
    assert err.value.connection_invalidated
    assert _backend_pid(engine) != first
