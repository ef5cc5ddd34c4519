"""The transaction manager's `TxStore` in SQL: one `tx_intents` row per intent, with every signed
attempt, saved (and committed) before each broadcast.

`writer_lock(name)` is the cross-process lock that makes one writer per operator key:
- PostgreSQL: a session-level advisory lock on its own connection, held for the block;
- SQLite: an exclusive `flock` on a file next to the database (every process on the machine that
  opens the same database file sees the same lock), plus a thread lock for this process.
The settlement service uses the same lock with another name to drive one epoch at a time, and
`key_lock` gives it to `ContractClient`s (the API replicas' x402 gas key) as their nonce lock.
"""

from __future__ import annotations

import fcntl
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from eth_hash.auto import keccak
from sqlalchemy import Engine, func, select, text
from sqlalchemy.orm import Session, sessionmaker

from node.chain.tx_manager import TxAttempt, TxRecord, TxState
from node.db.models import TxIntent
from node.db.types import utc_now

_THREAD_LOCKS: dict[str, threading.Lock] = {}
_THREAD_LOCKS_GUARD = threading.Lock()


def _thread_lock(name: str) -> threading.Lock:
    with _THREAD_LOCKS_GUARD:
        return _THREAD_LOCKS.setdefault(name, threading.Lock())


@contextmanager
def db_lock(engine: Engine, name: str) -> Iterator[None]:
    """An exclusive lock named `name`, shared by every process using this database."""
    if engine.dialect.name == "postgresql":
        key = int.from_bytes(keccak(name.encode())[:8], "big", signed=True)
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
            conn.commit()
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                conn.commit()
        return
    database = engine.url.database
    assert database and database != ":memory:", "the SQLite lock needs a database file"
    path = Path(f"{database}.{keccak(name.encode()).hex()[:16]}.lock")
    with _thread_lock(str(path)), open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def key_lock(engine: Engine) -> Callable[[str], AbstractContextManager[None]]:
    """The lock of a sender's nonces in this database: the one `SqlTxStore.writer_lock` takes, so every
    process sending with a key (a TxManager or a ContractClient) picks its nonces one at a time."""
    return lambda sender: db_lock(engine, f"tx-writer:{sender.lower()}")


def _attempt_json(a: TxAttempt) -> dict[str, Any]:
    return {"tx_hash": a.tx_hash, "max_fee_per_gas": str(a.max_fee_per_gas),
            "max_priority_fee_per_gas": str(a.max_priority_fee_per_gas), "raw": a.raw, "sent_at": a.sent_at,
            **({"is_cancel": True} if a.is_cancel else {})}


def _attempt(d: dict[str, Any]) -> TxAttempt:
    return TxAttempt(tx_hash=d["tx_hash"], max_fee_per_gas=int(d["max_fee_per_gas"]),
                     max_priority_fee_per_gas=int(d["max_priority_fee_per_gas"]), raw=d["raw"],
                     sent_at=float(d["sent_at"]), is_cancel=bool(d.get("is_cancel", False)))


def _record(row: TxIntent) -> TxRecord:
    from web3 import Web3

    return TxRecord(key=row.key, sender=Web3.to_checksum_address(row.sender), nonce=row.nonce,
                    to=Web3.to_checksum_address(row.to), data=row.data, value=row.value, gas=row.gas,
                    state=TxState(row.state), attempts=tuple(_attempt(a) for a in row.attempts),
                    mined_hash=row.mined_hash, mined_block=row.mined_block, error=row.error)


class SqlTxStore:
    """`TxStore` over the `tx_intents` table; every `save` commits before it returns."""

    def __init__(self, factory: sessionmaker[Session]) -> None:
        self.factory = factory
        self.engine: Engine = factory.kw["bind"]

    def load(self, key: str) -> TxRecord | None:
        with self.factory() as session:
            row = session.get(TxIntent, key)
            return None if row is None else _record(row)

    def save(self, record: TxRecord) -> None:
        with self.factory() as session, session.begin():
            row = session.get(TxIntent, record.key)
            if row is None:
                row = TxIntent(key=record.key)
                session.add(row)
            row.sender, row.nonce, row.to = record.sender.lower(), record.nonce, record.to.lower()
            row.data, row.value, row.gas, row.state = record.data, record.value, record.gas, record.state.value
            row.attempts = [_attempt_json(a) for a in record.attempts]
            row.mined_hash = None if record.mined_hash is None else record.mined_hash.lower()
            row.mined_block, row.error, row.updated_at = record.mined_block, record.error, utc_now()

    def max_nonce(self, sender: str) -> int | None:
        with self.factory() as session:
            never_seen = (TxIntent.state == TxState.FAILED.value) & TxIntent.mined_hash.is_(None)
            return session.scalar(select(func.max(TxIntent.nonce)).where(TxIntent.sender == sender.lower(),
                                                                        ~never_seen))

    def writer_lock(self, sender: str) -> Any:
        return key_lock(self.engine)(sender)

    def open_keys(self, sender: str) -> list[str]:
        """Intents not yet final or failed, oldest nonce first (what a restarted worker polls)."""
        q = (select(TxIntent.key).where(TxIntent.sender == sender.lower(),
                                        TxIntent.state.in_([TxState.PENDING.value, TxState.MINED.value]))
             .order_by(TxIntent.nonce))
        with self.factory() as session:
            return list(session.scalars(q))
