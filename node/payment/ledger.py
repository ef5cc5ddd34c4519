"""The stateful half of paying: lanes, reservations, the charge and its receipt, in the database.

Per (payer, node) every hold is placed under one lock (a transaction-scoped advisory lock on
PostgreSQL, shared by every API process of the node; a process-wide lock on SQLite), so that
concurrent requests on different lanes can never together spend more escrow than there is; a
charge or a release writes only its own lane's row, where the hold is (see `commit`):

    reserve:  cumulative >= chargedTotal + maxFee, spendable >= maxFee, lane not busy -> hold maxFee
    commit:   charge fee <= maxFee, new chargedTotal, voucher + signed receipt + response, one transaction
    release:  the generation failed or the client left: the hold goes, nothing is charged

A hold counts against the escrow until it is charged or released, or until it expires: a hold older
than `reservation_ttl_s` (its process crashed) no longer counts and its lane can be taken over. So
that an expired hold can never be charged as well (two charges against one escrow), the charge
refuses a hold older than `max_hold` (the TTL less `max_clock_skew_s`, the most two API processes'
clocks may differ), and the API ends every generation before that (GenerationService's time limit,
charged like a hang-up). A hold that is refused after tokens left the node is a recorded loss
(`write_off`). The alternative, holds that never expire and a liveness rule for crashed processes,
needs every process to heartbeat; a TTL needs nothing but agreeing clocks: on PostgreSQL every API process
times its holds and charges by the database's clock (node/shared_clock.py: its own plus the difference, read
every minute), so replicas whose own clocks drift apart still agree on every hold's age. (SQLite: one process.)

Each step is one transaction of `Lanes` (node/payment/lane.py): on PostgreSQL a hold is one statement
and a charge one, a round trip each (lane_pg.py), on SQLite a few Core statements (lane_sqlite.py).
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, Engine, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from node.db import queries
from node.db.loss import LossReason, LossRecord, record_loss
from node.db.models import Lane, Loss, Receipt, Voucher
from node.errors import NodeError, VoucherConflict
from node.flight_cache import FlightCache
from node.payment.hold_rule import HoldRequest, refusal
from node.payment.lane import Lanes
from node.payment.lane_pg import PipelinedLanes
from node.payment.lane_sqlite import SQLiteLanes
from node.payment.voucher_check import CheckedVoucher
from node.protocol.receipt import SignedReceipt
from node.protocol.voucher import SignedVoucher
from node.shared_clock import SharedClock

log = logging.getLogger(__name__)
MAX_SUMMING = 4  # payers' uncollected totals summed at once for `channel`, each on a pooled connection


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
    last_voucher: SignedVoucher | None = None  # the payer's own signature on last_cumulative: what proves it


class Ledger:
    def __init__(self, factory: sessionmaker[Session], node: str, *, reservation_ttl_s: float = 600.0,
                 max_clock_skew_s: float = 5.0, instance: str | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.factory = factory
        self.node = node.lower()
        self.instance = instance or socket.gethostname()  # this API process, as its holds name it
        self.ttl = timedelta(seconds=reservation_ttl_s)
        # a hold may be charged this long after it was placed (never past the TTL on any process's clock)
        self.max_hold = self.ttl - timedelta(seconds=min(max_clock_skew_s, reservation_ttl_s / 10))
        self._uncollected: FlightCache[str, int] = FlightCache(0, lambda _: 1, MAX_SUMMING)
        engine = self._engine()
        self.lanes: Lanes = SQLiteLanes(engine) if engine.dialect.name == "sqlite" else PipelinedLanes(engine)
        # the clock holds are stamped and aged by: the database's where replicas share it
        self.clock: Callable[[], float] = clock
        if engine.dialect.name != "sqlite":  # read once here, then on a thread of its own: a request never
            shared = SharedClock(clock, self._database_time, "database", background=True)  # waits on it
            shared.measure()
            self.clock = shared

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC)

    def _database_time(self) -> float:
        with self._engine().connect() as conn:
            return float(conn.execute(text("SELECT extract(epoch FROM clock_timestamp())")).scalar_one())

    def _engine(self) -> Engine:
        bind = self.factory.kw["bind"]
        assert isinstance(bind, Engine), "the ledger's sessions are bound to one engine"
        return bind

    # --- reads ------------------------------------------------------------------------------------
    def stored_response(self, voucher_hash: str) -> dict[str, Any] | None:
        with self.factory() as session:
            row = session.get(Voucher, voucher_hash)
            return None if row is None else row.response

    def epoch_receipt(self, voucher_hash: str) -> tuple[str, int] | None:
        """(receipt id, epoch id) of a voucher whose receipt is in an epoch: the voucher, with its
        signature, is then in a settle transaction, public."""
        with self.factory() as session:
            row = session.scalars(select(Receipt).where(Receipt.voucher_hash == voucher_hash)).first()
            if row is None or row.epoch_id is None:
                return None
            return row.receipt_hash, row.epoch_id

    def channel(self, payer: str, lane: int) -> Channel:
        """The lane by key and the payer's spendable escrow. The escrow less what the payer's lanes leave
        uncollected is one sum over all of them (queries.uncollected), and anyone may ask (GET /v1/channels,
        the budgets' `spendable`): concurrent askers about one payer share one sum (taken on a connection of
        its own, at most MAX_SUMMING at once), so a flood about a payer with many lanes costs one sum at a time,
        not one per ask. A sharer may see a sum begun before it asked; a hold counts every lane again."""
        payer = payer.lower()
        owed = self._uncollected.get(payer, self._uncollected_of)
        with self.factory() as session:
            row = session.get(Lane, (payer, self.node, lane))
            spendable = queries.escrow(session, payer, self.node, owed).spendable
            voucher = session.get(Voucher, row.last_voucher_hash) if row and row.last_voucher_hash else None
        charged, last = (row.charged_total, row.last_cumulative) if row else (0, 0)
        return Channel(payer, self.node, lane, charged, last, spendable,
                       SignedVoucher.from_row(voucher) if voucher is not None else None)

    def _uncollected_of(self, payer: str) -> tuple[int, bool]:
        with self.factory() as session:
            return queries.uncollected(session, payer, self.node), False  # shared while read, never kept

    # --- writes -----------------------------------------------------------------------------------
    def reserve(self, checked: CheckedVoucher, max_fee: int,
                before_new: Callable[[], None] | None = None) -> Reservation | dict[str, Any]:
        """Hold `max_fee` on the voucher's lane; or, for a voucher already served, its stored response.
        `before_new` may refuse (raise) a voucher never seen before; a used one is answered all the same."""
        v, digest, now = checked.voucher, checked.digest_hex, self._now()
        too_late = _refusal_of(before_new)
        request = HoldRequest(v.payer.lower(), self.node, v.lane, digest, v.cumulative, max_fee, now, now - self.ttl,
                              self.instance, is_fresh=too_late is None)
        view, is_held = self.lanes.hold(request)
        if view.is_used:
            if view.response is not None:
                return view.response
            raise VoucherConflict("this voucher was already used", voucher_hash=digest)
        why = too_late or refusal(view, request)
        if why is None and is_held:
            return Reservation(request.payer, self.node, v.lane, digest, v.cumulative, max_fee,
                               view.lane.charged_total)
        if is_held:  # the database's copy of the rule let through what refusal() refuses: undo it, say so
            log.error("hold rule mismatch: the database held lane %d for %s, refused here: %s", v.lane, digest, why)
            self.release(Reservation(request.payer, self.node, v.lane, digest, v.cumulative, max_fee, 0))
        raise why or VoucherConflict("the hold was not placed: the lane changed while it was read; retry",
                                     lane=v.lane)

    def commit(self, res: Reservation, checked: CheckedVoucher, fee: int, receipt: SignedReceipt,
               response: Callable[[int], dict[str, Any]]) -> tuple[int, dict[str, Any]]:
        """Charge `fee`, store voucher, receipt and the response body built for the new charged total."""
        assert 0 <= fee <= res.max_fee, "a fee above the quote the voucher covers"
        now, total = self._now(), res.charged_before + fee
        # Only this lane's row is written (no payer lock): a concurrent `reserve` of another lane reads
        # this one either with its hold or with its charge (<= the hold), and counts either against the
        # escrow. While the hold is ours nobody else charges the lane, so the new total is known here.
        body = response(total)
        voucher = {**checked.columns(), "voucher_hash": res.voucher_hash, "payer": res.payer, "node": self.node,
                   "lane": res.lane, "charged_total": total, "response": body, "created_at": now}
        row = {**receipt.columns(), "voucher_hash": res.voucher_hash, "node": self.node, "created_at": now}
        if not self.lanes.charge(voucher, row, res.charged_before, now - self.max_hold, self.instance):
            raise VoucherConflict("the lane's hold expired or was taken over; nothing was charged",
                                      lane=res.lane, max_hold_s=self.max_hold.total_seconds())
        return total, body

    def write_off(self, res: Reservation, checked: CheckedVoucher, amount: int, reason: LossReason,
                  detail: str) -> None:
        """Spend the voucher without a charge and record `amount` as lost, in one transaction: tokens
        left the node and will never be paid (a node fault, or a charge that could not be committed).
        The hold goes (if still ours); the voucher is stored without a response, so it never buys
        another generation (a retry is 409). A voucher that was charged after all (its COMMIT went through,
        the connection dropped before this process read the answer) keeps its charge and receipt: no loss."""
        with self.factory.begin() as session:
            session.execute(update(Lane).where(Lane.payer == res.payer, Lane.node == self.node, Lane.lane == res.lane,
                                               Lane.reserved_voucher_hash == res.voucher_hash,
                                               Lane.reserved_by == self.instance)
                            .values(reserved=0, reserved_voucher_hash=None, reserved_at=None, reserved_by=None))
            if session.scalar(select(Receipt.receipt_hash).where(Receipt.voucher_hash == res.voucher_hash)) is not None:
                log.warning("write-off of voucher %s skipped: it was charged", res.voucher_hash)
                return
            if session.get(Voucher, res.voucher_hash) is None:
                session.add(Voucher(**{**checked.columns(), "voucher_hash": res.voucher_hash, "payer": res.payer,
                                       "node": self.node, "lane": res.lane, "charged_total": res.charged_before,
                                       "response": None, "created_at": self._now()}))
            recorded = session.scalar(select(Loss.id).where(Loss.node == self.node, Loss.epoch_id.is_(None),
                                                            Loss.voucher_hash == res.voucher_hash).limit(1))
            if recorded is None:  # once: a spooled write-off may be written again after a crash
                record_loss(session, LossRecord(self.node, res.payer, res.lane, amount, reason, res.voucher_hash,
                                                detail=detail))

    def release(self, res: Reservation) -> None:
        """Drop the hold (if still ours): nothing is charged. No payer lock is needed: a concurrent
        `reserve` reads the hold either still there (and counts it) or gone."""
        self.lanes.drop_hold(res.payer, self.node, res.lane, res.voucher_hash, self.instance)

    def forget_responses(self, older_than: timedelta) -> int:
        """Drop stored response bodies past the idempotency window (vouchers and receipts stay)."""
        with self.factory.begin() as session:
            result = session.execute(update(Voucher).where(Voucher.created_at < self._now() - older_than,
                                                           Voucher.response.is_not(None)).values(response=None))
            return cast(CursorResult[Any], result).rowcount  # an UPDATE's result (Session.execute is typed Result)


def _refusal_of(check: Callable[[], None] | None) -> NodeError | None:
    """What `check` raises (a refusal of a new voucher), or None."""
    try:
        if check is not None:
            check()
    except NodeError as exc:
        return exc
    return None
