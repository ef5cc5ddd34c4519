"""The indexer cursor of one chain: how far the mirror goes, the chain it is bound to, and the
indexer's health as the API reads it (the head it last saw, why it stalled, why it halted)."""

from __future__ import annotations

import logging
from typing import NoReturn

from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from node.chain.binding import IndexedContracts
from node.db.models import IndexerCursor
from node.db.types import utc_now
from node.errors import ChainMismatch, ReorgTooDeep, RpcTransient

log = logging.getLogger(__name__)


class Cursors:
    """Reads and health writes of the cursor row of `chain_id` (each write its own transaction)."""

    def __init__(self, sessions: sessionmaker[Session], chain_id: int, start_block: int,
                 contracts: IndexedContracts) -> None:
        self.sessions = sessions
        self.chain_id = chain_id
        self.start_block = start_block
        self.contracts = contracts
        self.genesis_hash: str | None = None  # the bound chain's, once `Indexer.bind` has checked it

    def get(self, session: Session, lock: bool = False) -> IndexerCursor:
        """The cursor (a new one, not yet added, before the mirror's first write). Its contracts are
        held against the indexer's by `Indexer.bind`."""
        cur = session.get(IndexerCursor, self.chain_id, with_for_update=lock)
        if cur is None:
            cur = IndexerCursor(chain_id=self.chain_id, last_block=self.start_block - 1, last_block_hash=None,
                                final_block=-1, contracts=self.contracts.fingerprint(),
                                genesis_hash=self.genesis_hash)
        return cur

    def halt(self, error: ChainMismatch | ReorgTooDeep) -> NoReturn:
        """Write why the mirror stops (the API refuses paid work from then on), then raise `error`."""
        with self.sessions() as session, session.begin():
            cursor = self.get(session, lock=True)
            cursor.halted_reason = f"{error.code}: {error.message}"
            session.add(cursor)
        log.error("indexer halted: %s %s", error.message, error.facts)
        raise error

    def note_stall(self, error: Exception) -> None:
        """Write why the last step failed (cleared by the next good step)."""
        reason = f"{error.code}: {error.message}" if isinstance(error, RpcTransient) else "database unavailable"
        try:
            with self.sessions() as session, session.begin():
                cursor = self.get(session, lock=True)
                cursor.stalled_reason = reason
                session.add(cursor)
        except OperationalError:
            log.warning("could not note the stall on the cursor: the database is unavailable")

    @staticmethod
    def mark_checked(cursor: IndexerCursor, head: int) -> None:
        """A good step: it saw `head` on the mirror's own chain."""
        cursor.head_block, cursor.checked_at, cursor.stalled_reason = head, utc_now(), None
