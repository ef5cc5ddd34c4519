"""The stateful half of paying: lanes, reservations, the charge and its receipt, in the database.

Per (payer, node) every change runs under one lock (a transaction-scoped advisory lock on
PostgreSQL, shared by every API process of the node; a process-wide lock on SQLite), so that
concurrent requests on different lanes can never together spend more escrow than there is:

    reserve:  cumulative >= chargedTotal + maxFee, spendable >= maxFee, lane not busy -> hold maxFee
    commit:   charge fee <= maxFee, new chargedTotal, voucher + signed receipt + response, one transaction
    release:  the generation failed or the client left: the hold goes, nothing is charged

A hold older than `reservation_ttl_s` (a crashed process) no longer counts and can be taken over.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from eth_hash.auto import keccak
from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker

from node.db import queries
from node.db.models import EscrowAccount, Lane, LaneCollection, Receipt, Voucher
from node.db.queries import ReceiptFields as ReceiptRow  # what the ledger stores, as given
from node.errors import InsufficientEscrow, VoucherConflict
from node.payment.voucher_check import CheckedVoucher


@dataclass(frozen=True)
class Reservation:
    payer: str
    node: str
    lane: int
    voucher_hash: str
    cumulative: int
    max_fee: int
    charged_before: int


@dataclass(frozen=True)
class Channel:
    payer: str
    node: str
    lane: int
    charged_total: int
    last_cumulative: int
    spendable: int


class Ledger:
    def __init__(self, factory: sessionmaker[Session], node: str, *, reservation_ttl_s: float = 600.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.factory = factory
        self.node = node.lower()
        self.ttl = timedelta(seconds=reservation_ttl_s)
        self.clock = clock
        self._sqlite_lock = threading.Lock() if factory.kw["bind"].dialect.name == "sqlite" else None

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC)

    @contextmanager
    def _locked(self, payer: str) -> Iterator[tuple[Session, dict[int, Lane]]]:
        """A transaction holding the lock on every lane of (payer, this node)."""
        guard = self._sqlite_lock or _NoLock()
        with guard, self.factory() as session, session.begin():
            if self._sqlite_lock is None:
                key = int.from_bytes(keccak(f"lanes:{payer}:{self.node}".encode())[:8], "big", signed=True)
                session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
            rows = session.scalars(select(Lane).where(Lane.payer == payer, Lane.node == self.node)).all()
            yield session, {r.lane: r for r in rows}

    def _holds(self, lanes: dict[int, Lane], now: datetime, but: int | None = None) -> int:
        return sum(r.reserved for r in lanes.values()
                   if r.lane != but and r.reserved_voucher_hash and r.reserved_at and now - r.reserved_at < self.ttl)

    # --- reads ------------------------------------------------------------------------------------
    def stored_response(self, voucher_hash: str) -> dict[str, Any] | None:
        with self.factory() as session:
            row = session.get(Voucher, voucher_hash)
            return None if row is None else row.response

    def channel(self, payer: str, lane: int) -> Channel:
        payer = payer.lower()
        with self.factory() as session:
            row = session.get(Lane, (payer, self.node, lane))
            spendable = queries.spendable_escrow(session, payer, self.node)
        charged, last = (row.charged_total, row.last_cumulative) if row else (0, 0)
        return Channel(payer, self.node, lane, charged, last, spendable)

    # --- writes -----------------------------------------------------------------------------------
    def reserve(self, checked: CheckedVoucher, max_fee: int,
                before_new: Callable[[], None] | None = None) -> Reservation | dict[str, Any]:
        """Hold `max_fee` on the voucher's lane; or, for a voucher already served, its stored response.
        `before_new` runs (and may raise) only for a voucher never seen before."""
        v = checked.voucher
        payer, now = v.payer.lower(), self._now()
        with self._locked(payer) as (session, lanes):
            used = session.get(Voucher, checked.digest_hex)
            if used is not None:
                if used.response is not None:
                    return used.response
                raise VoucherConflict("this voucher was already used", voucher_hash=checked.digest_hex)
            if before_new is not None:
                before_new()
            row = lanes.get(v.lane)
            if row is None:
                row = Lane(payer=payer, node=self.node, lane=v.lane, charged_total=0, last_cumulative=0, reserved=0)
                session.add(row)
            self._check_order(row, checked, max_fee, now)
            balance, thawing, uncollected = self._escrow(session, payer, lanes)
            spendable = max(balance - thawing - uncollected, 0) - self._holds(lanes, now, but=v.lane)
            if spendable < max_fee:
                raise InsufficientEscrow("not enough escrow for this request", spendable=spendable, max_fee=max_fee,
                                         balance=balance, thawing=thawing)
            row.reserved, row.reserved_voucher_hash, row.reserved_at = max_fee, checked.digest_hex, now
            row.updated_at = now
            return Reservation(payer, self.node, v.lane, checked.digest_hex, v.cumulative, max_fee, row.charged_total)

    def _escrow(self, session: Session, payer: str, lanes: dict[int, Lane]) -> tuple[int, int, int]:
        """(balance, thawing, charged but uncollected on all lanes) from the mirror and the loaded lanes."""
        acct = session.get(EscrowAccount, (payer, self.node))
        collected = {r.lane: r.collected for r in session.scalars(
            select(LaneCollection).where(LaneCollection.payer == payer, LaneCollection.node == self.node))}
        uncollected = sum(max(r.charged_total - collected.get(r.lane, 0), 0) for r in lanes.values())
        return (acct.balance, acct.thawing, uncollected) if acct else (0, 0, uncollected)

    def _check_order(self, row: Lane, checked: CheckedVoucher, max_fee: int, now: datetime) -> None:
        v = checked.voucher
        # A hold on this lane blocks every other voucher until it ends or expires; the same voucher sent
        # again takes its hold over (its first request died with its process, or its client retried):
        # at most one of the two can commit, so it is still charged at most once.
        held = row.reserved_voucher_hash
        if held and held != checked.digest_hex and row.reserved_at and now - row.reserved_at < self.ttl:
            raise VoucherConflict("a request is already in flight on this lane: use another lane",
                                  lane=v.lane, in_flight=row.reserved_voucher_hash)
        if v.cumulative < row.last_cumulative:
            raise VoucherConflict("stale voucher: cumulative is below one already accepted on this lane",
                                  lane=v.lane, cumulative=str(v.cumulative), last_cumulative=str(row.last_cumulative))
        needed = row.charged_total + max_fee
        if v.cumulative < needed:
            raise InsufficientEscrow("the voucher does not cover this request: sign chargedTotal + maxFee",
                                     lane=v.lane, cumulative=str(v.cumulative), charged_total=str(row.charged_total),
                                     max_fee=str(max_fee), needed=str(needed))

    def commit(self, res: Reservation, checked: CheckedVoucher, fee: int, receipt: ReceiptRow,
               response: Callable[[int], dict[str, Any]]) -> tuple[int, dict[str, Any]]:
        """Charge `fee`, store voucher, receipt and the response body built for the new charged total."""
        assert 0 <= fee <= res.max_fee, "a fee above the quote the voucher covers"
        now = self._now()
        # Only this lane's row is locked: a concurrent `reserve` of another lane reads this one either
        # with its hold or with its charge (<= the hold), both of which it counts against the escrow.
        with self._sqlite_lock or _NoLock(), self.factory() as session, session.begin():
            row = session.scalars(select(Lane).where(Lane.payer == res.payer, Lane.node == self.node,
                                                     Lane.lane == res.lane).with_for_update()).first()
            if row is None or row.reserved_voucher_hash != res.voucher_hash:
                raise VoucherConflict("the lane's hold expired and was taken over; nothing was charged",
                                      lane=res.lane)
            row.charged_total += fee
            row.last_cumulative = res.cumulative
            row.last_voucher_hash = res.voucher_hash
            row.reserved, row.reserved_voucher_hash, row.reserved_at, row.updated_at = 0, None, None, now
            body = response(row.charged_total)
            v = checked.voucher
            session.add(Voucher(voucher_hash=res.voucher_hash, payer=res.payer, node=self.node, lane=res.lane,
                                cumulative=v.cumulative, request_hash="0x" + v.request_hash.hex(),
                                deadline=v.deadline, signature="0x" + checked.signature.hex(),
                                charged_total=row.charged_total, response=body, created_at=now))
            session.flush()
            session.add(Receipt(voucher_hash=res.voucher_hash, node=self.node, created_at=now,
                                **receipt.__dict__))
            return row.charged_total, body

    def release(self, res: Reservation) -> None:
        with self._locked(res.payer) as (_, lanes):
            row = lanes.get(res.lane)
            if row is not None and row.reserved_voucher_hash == res.voucher_hash:
                row.reserved, row.reserved_voucher_hash, row.reserved_at = 0, None, None

    def forget_responses(self, older_than: timedelta) -> int:
        """Drop stored response bodies past the idempotency window (vouchers and receipts stay)."""
        cutoff = self._now() - older_than
        with self.factory() as session, session.begin():
            rows = session.scalars(select(Voucher).where(Voucher.created_at < cutoff,
                                                         Voucher.response.is_not(None))).all()
            for r in rows:
                r.response = None
            return len(rows)


class _NoLock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
