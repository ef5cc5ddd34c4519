"""One API process per SQLite file. On SQLite the ledger serialises holds with a lock of the process
(node/payment/lane_sqlite.py), so a second API process on the same file could double-spend the escrow.
The API takes an exclusive OS lock on a file next to the database for its whole life; a second one
refuses to start, saying which process holds it. (PostgreSQL shares its hold lock across processes.)"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path

from sqlalchemy.engine import make_url

from node.errors import ConfigError

log = logging.getLogger(__name__)


class SQLiteLock:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    @classmethod
    def for_database(cls, url: str) -> SQLiteLock | None:
        """The lock for a SQLite file database; None for another backend or an in-memory one."""
        parsed = make_url(url)
        if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
            return None
        return cls(Path(parsed.database).resolve().with_name(Path(parsed.database).name + ".api.lock"))

    def acquire(self) -> None:
        """Hold the lock until `release` or the process ends; ConfigError if another process holds it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(f"another API process (pid {holder}) serves this SQLite database: one API per SQLite "
                              "file (use PostgreSQL for more)", lock=str(self.path), pid=holder) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        log.info("holding %s: the only API process on this SQLite database", self.path)

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
