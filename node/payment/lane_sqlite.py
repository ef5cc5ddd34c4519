"""The ledger's lanes on SQLite: SQLAlchemy Core, one statement per step, holds serialised by a
process-wide lock (one API process per SQLite file: `loranode dev`, the demo, the tests).

    hold:    hold view (the payer's totals summed in it)  ->  hold_rule.refusal  ->  INSERT .. ON CONFLICT
    charge:  UPDATE the lane WHERE the hold is still ours  ->  INSERT voucher  ->  INSERT receipt

Money columns are `Amount`, a zero-padded string on SQLite (node/db/types.py), which SQLite's own
sum() would turn into floats: the hold view sums them with the exact `amount_sum` and `owed_sum`
that make_engine adds to every SQLite connection, so no lane row leaves the database. PostgreSQL runs
the same steps as written-out SQL in lane_pg.py.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from datetime import datetime
from typing import Any, cast

from sqlalchemy import (
    Connection,
    Engine,
    String,
    Table,
    and_,
    bindparam,
    case,
    exists,
    func,
    insert,
    literal_column,
    select,
    true,
    update,
)
from sqlalchemy.dialects import sqlite
from sqlalchemy.sql import Select, Subquery

from node.db.loss import is_written_off
from node.db.models import Lane, Loss, Receipt, Voucher
from node.db.payment_models import EscrowAccount, LaneCollection
from node.db.types import Amount
from node.payment.hold_rule import HoldRequest, refusal
from node.payment.lane import NEW_LANE, HoldView, LaneRow

LANES = cast(Table, Lane.__table__)
COLLECTIONS = cast(Table, LaneCollection.__table__)
ESCROW = cast(Table, EscrowAccount.__table__)
VOUCHERS = cast(Table, Voucher.__table__)
RECEIPTS = cast(Table, Receipt.__table__)


class SQLiteLaneTransaction:
    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def hold_view(self, payer: str, node: str, lane: int, voucher_hash: str, live_since: datetime) -> HoldView:
        row = self.conn.execute(_HOLD_VIEW, {"payer": payer, "node": node, "lane": lane, "voucher_hash": voucher_hash,
                                             "live_since": live_since}).one()
        this = NEW_LANE if row.charged_total is None else LaneRow(row.charged_total, row.last_cumulative,
                                                                  row.reserved_voucher_hash, row.reserved_at,
                                                                  row.reserved_by)
        return HoldView(is_used=row.is_used, response=row.response, lane=this, balance=row.balance or 0,
                        thawing=row.thawing or 0, uncollected=row.uncollected or 0,
                        other_holds=row.other_holds or 0,
                        pending_deposits=row.pending_deposits or 0, pending_until_block=row.pending_until_block,
                        final_thawing=row.final_thawing or 0)

    def lane_view(self, payer: str, node: str, lane: int, voucher_hash: str) -> HoldView:
        row = self.conn.execute(_LANE_VIEW, {"payer": payer, "node": node, "lane": lane,
                                             "voucher_hash": voucher_hash}).one()
        this = NEW_LANE if row.charged_total is None else LaneRow(row.charged_total, row.last_cumulative,
                                                                  row.reserved_voucher_hash, row.reserved_at,
                                                                  row.reserved_by)
        return HoldView(is_used=row.is_used, response=row.response, lane=this, balance=0, thawing=0,
                        uncollected=0, other_holds=0)

    def try_hold(self, r: HoldRequest) -> tuple[HoldView, bool]:
        view = self.hold_view(r.payer, r.node, r.lane, r.voucher_hash, r.live_since)
        is_held = not view.is_used and r.is_fresh and refusal(view, r) is None
        if is_held:
            self.put_hold(r.payer, r.node, r.lane, r.max_fee, r.voucher_hash, r.now, r.owner)
        return view, is_held

    def put_hold(self, payer: str, node: str, lane: int, max_fee: int, voucher_hash: str, now: datetime,
                 owner: str) -> None:
        self.conn.execute(_PUT_HOLD, {"payer": payer, "node": node, "lane": lane, "charged_total": 0,
                                      "last_cumulative": 0, "reserved": max_fee, "reserved_voucher_hash": voucher_hash,
                                      "reserved_at": now, "reserved_by": owner, "updated_at": now})

    def charge(self, voucher: dict[str, Any], receipt: dict[str, Any], charged_before: int,
               held_since: datetime, owner: str) -> bool:
        result = self.conn.execute(_CHARGE, {
            "k_payer": voucher["payer"], "k_node": voucher["node"], "k_lane": voucher["lane"],
            "k_hash": voucher["voucher_hash"], "k_owner": owner, "k_before": charged_before,
            "k_held_since": held_since,
            "charged_total": voucher["charged_total"],
            "last_cumulative": voucher["cumulative"], "last_voucher_hash": voucher["voucher_hash"],
            "updated_at": voucher["created_at"]})
        if result.rowcount != 1:
            return False
        self.conn.execute(insert(VOUCHERS), voucher)
        self.conn.execute(insert(RECEIPTS), receipt)
        return True

    def drop_hold(self, payer: str, node: str, lane: int, voucher_hash: str, owner: str) -> None:
        self.conn.execute(_DROP_HOLD, {"k_payer": payer, "k_node": node, "k_lane": lane, "k_hash": voucher_hash,
                                       "k_owner": owner})


class SQLiteLanes:
    def __init__(self, engine: Engine) -> None:
        assert engine.dialect.name == "sqlite"
        self.engine = engine
        self._hold_lock = threading.Lock()

    def hold(self, request: HoldRequest) -> tuple[HoldView, bool]:
        with self.transaction(lock_payer=request.payer, node=request.node) as tx:
            return tx.try_hold(request)

    def charge(self, voucher: dict[str, Any], receipt: dict[str, Any], charged_before: int,
               held_since: datetime, owner: str) -> bool:
        with self.transaction() as tx:
            return tx.charge(voucher, receipt, charged_before, held_since, owner)

    def drop_hold(self, payer: str, node: str, lane: int, voucher_hash: str, owner: str) -> None:
        with self.transaction() as tx:
            tx.drop_hold(payer, node, lane, voucher_hash, owner)

    @contextmanager
    def transaction(self, lock_payer: str | None = None, node: str = "",
                    lock_lane: int | None = None) -> Iterator[SQLiteLaneTransaction]:
        """One SQLite transaction; a hold's (`lock_payer`) also holds the process's hold lock (SQLite has
        one writer: `lock_lane` narrows nothing here)."""
        with self._hold_lock if lock_payer is not None else nullcontext(), self.engine.begin() as conn:
            yield SQLiteLaneTransaction(conn)


# --- the statements, built once (named parameters; SQLAlchemy caches their compiled form) ----------
def _lane_view(totals: Subquery | None = None) -> Select[Any]:
    """One row, left-joined from a one-row anchor: the voucher's use, the escrow account, this lane (and
    `totals`' one row)."""
    payer, node, voucher_hash = (bindparam(name, type_=String) for name in ("payer", "node", "voucher_hash"))
    anchor = select(literal_column("1").label("one")).subquery("anchor")
    this = LANES.alias("this_lane")
    view = (select(exists().where(VOUCHERS.c.voucher_hash == voucher_hash).label("is_used"),
                   select(VOUCHERS.c.response).where(VOUCHERS.c.voucher_hash == voucher_hash)
                   .scalar_subquery().label("response"),
                   ESCROW.c.balance, ESCROW.c.thawing, ESCROW.c.pending_deposits, ESCROW.c.pending_until_block,
                   ESCROW.c.final_thawing,
                   this.c.charged_total, this.c.last_cumulative,
                   this.c.reserved_voucher_hash, this.c.reserved_at, this.c.reserved_by)
            .select_from(anchor.outerjoin(ESCROW, and_(ESCROW.c.payer == payer, ESCROW.c.node == node))
                         .outerjoin(this, and_(this.c.payer == payer, this.c.node == node,
                                               this.c.lane == bindparam("lane")))))
    if totals is None:
        return view
    return view.add_columns(*totals.c).join(totals, true())


def _hold_view() -> Select[Any]:
    """The lane view and the payer's totals over its lanes, summed in SQL: what they owe (each lane's
    charge less its collection and its write-offs, looked up by key) and the live holds on its other
    lanes (hold_rule.funds_refusal)."""
    x = LANES.alias("x")
    collected = (select(COLLECTIONS.c.collected)
                 .where(COLLECTIONS.c.payer == x.c.payer, COLLECTIONS.c.node == x.c.node,
                        COLLECTIONS.c.lane == x.c.lane).scalar_subquery())
    lost = (select(func.amount_sum(case((is_written_off(), Loss.amount))))  # never collectible (node/db/loss.py)
            .where(Loss.node == x.c.node, Loss.payer == x.c.payer, Loss.lane == x.c.lane).scalar_subquery())
    other_hold = case((and_(x.c.lane != bindparam("lane"), x.c.reserved_voucher_hash.is_not(None),
                            x.c.reserved_at > bindparam("live_since", type_=x.c.reserved_at.type)), x.c.reserved))
    totals = (select(func.owed_sum(x.c.charged_total, collected, lost, type_=Amount()).label("uncollected"),
                     func.amount_sum(other_hold, type_=Amount()).label("other_holds"))
              .where(x.c.payer == bindparam("payer", type_=String), x.c.node == bindparam("node", type_=String))
              .subquery("totals"))
    return _lane_view(totals)


def _put_hold() -> Any:
    stmt = sqlite.insert(LANES)
    held = ("reserved", "reserved_voucher_hash", "reserved_at", "reserved_by", "updated_at")
    return stmt.on_conflict_do_update(index_elements=[LANES.c.payer, LANES.c.node, LANES.c.lane],
                                      set_={c: stmt.excluded[c] for c in held})


def _lane_key() -> Any:
    return and_(LANES.c.payer == bindparam("k_payer"), LANES.c.node == bindparam("k_node"),
                LANES.c.lane == bindparam("k_lane"), LANES.c.reserved_voucher_hash == bindparam("k_hash"),
                LANES.c.reserved_by == bindparam("k_owner"))


_LANE_VIEW = _lane_view()
_HOLD_VIEW = _hold_view()
_PUT_HOLD = _put_hold()
_CHARGE = (update(LANES).where(_lane_key(), LANES.c.charged_total == bindparam("k_before"),
                               LANES.c.reserved_at > bindparam("k_held_since", type_=LANES.c.reserved_at.type))
           .values(reserved=0, reserved_voucher_hash=None, reserved_at=None, reserved_by=None))
_DROP_HOLD = (update(LANES).where(_lane_key())
              .values(reserved=0, reserved_voucher_hash=None, reserved_at=None, reserved_by=None))
