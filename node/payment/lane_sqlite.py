"""The ledger's lanes on SQLite: SQLAlchemy Core, one statement per step, holds serialised by a
process-wide lock (one API process per SQLite file: `loranode dev`, the demo, the tests).

    hold:    hold view (+ the payer's lane rows, summed here)  ->  hold_rule.refusal  ->  INSERT .. ON CONFLICT
    charge:  UPDATE the lane WHERE the hold is still ours  ->  INSERT voucher  ->  INSERT receipt

Money columns are `Amount`, a zero-padded string on SQLite (node/db/types.py), so amounts are added
up in Python, never in SQL. PostgreSQL runs the same steps as written-out SQL in lane_pg.py.
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
    exists,
    insert,
    literal_column,
    select,
    update,
)
from sqlalchemy.dialects import sqlite
from sqlalchemy.sql import Select

from node.db.loss import written_off
from node.db.models import EscrowAccount, Lane, LaneCollection, Receipt, Voucher
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
        params = {"payer": payer, "node": node, "lane": lane, "voucher_hash": voucher_hash}
        row = self.conn.execute(_HOLD_VIEW, params).one()
        uncollected, other_holds = 0, 0
        lost = written_off(self.conn, payer, node)  # never collectible: no longer owed from the escrow
        for r in self.conn.execute(_LANE_ROWS, params):
            uncollected += max(r.charged_total - (r.collected or 0) - lost.get(r.lane, 0), 0)
            if r.lane != lane and r.reserved_voucher_hash and r.reserved_at and r.reserved_at > live_since:
                other_holds += r.reserved
        this = NEW_LANE if row.charged_total is None else LaneRow(row.charged_total, row.last_cumulative,
                                                                  row.reserved_voucher_hash, row.reserved_at,
                                                                  row.reserved_by)
        return HoldView(is_used=row.is_used, response=row.response, lane=this, balance=row.balance or 0,
                        thawing=row.thawing or 0, uncollected=uncollected, other_holds=other_holds,
                        pending_deposits=row.pending_deposits or 0, pending_until_block=row.pending_until_block,
                        final_thawing=row.final_thawing or 0)

    def lane_view(self, payer: str, node: str, lane: int, voucher_hash: str) -> HoldView:
        row = self.conn.execute(_HOLD_VIEW, {"payer": payer, "node": node, "lane": lane,
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
def _hold_view() -> Select[Any]:
    """One row, left-joined from a one-row anchor: the voucher's use, the escrow account, this lane."""
    payer, node, voucher_hash = (bindparam(name, type_=String) for name in ("payer", "node", "voucher_hash"))
    anchor = select(literal_column("1").label("one")).subquery("anchor")
    this = LANES.alias("this_lane")
    return (select(exists().where(VOUCHERS.c.voucher_hash == voucher_hash).label("is_used"),
                   select(VOUCHERS.c.response).where(VOUCHERS.c.voucher_hash == voucher_hash)
                   .scalar_subquery().label("response"),
                   ESCROW.c.balance, ESCROW.c.thawing, ESCROW.c.pending_deposits, ESCROW.c.pending_until_block,
                   ESCROW.c.final_thawing,
                   this.c.charged_total, this.c.last_cumulative,
                   this.c.reserved_voucher_hash, this.c.reserved_at, this.c.reserved_by)
            .select_from(anchor.outerjoin(ESCROW, and_(ESCROW.c.payer == payer, ESCROW.c.node == node))
                         .outerjoin(this, and_(this.c.payer == payer, this.c.node == node,
                                               this.c.lane == bindparam("lane")))))


def _put_hold() -> Any:
    stmt = sqlite.insert(LANES)
    held = ("reserved", "reserved_voucher_hash", "reserved_at", "reserved_by", "updated_at")
    return stmt.on_conflict_do_update(index_elements=[LANES.c.payer, LANES.c.node, LANES.c.lane],
                                      set_={c: stmt.excluded[c] for c in held})


def _lane_key() -> Any:
    return and_(LANES.c.payer == bindparam("k_payer"), LANES.c.node == bindparam("k_node"),
                LANES.c.lane == bindparam("k_lane"), LANES.c.reserved_voucher_hash == bindparam("k_hash"),
                LANES.c.reserved_by == bindparam("k_owner"))


_HOLD_VIEW = _hold_view()
_LANE_ROWS = (select(LANES.c.lane, LANES.c.charged_total, LANES.c.reserved, LANES.c.reserved_voucher_hash,
                     LANES.c.reserved_at, COLLECTIONS.c.collected)
              .select_from(LANES.outerjoin(COLLECTIONS, and_(COLLECTIONS.c.payer == LANES.c.payer,
                                                             COLLECTIONS.c.node == LANES.c.node,
                                                             COLLECTIONS.c.lane == LANES.c.lane)))
              .where(LANES.c.payer == bindparam("payer"), LANES.c.node == bindparam("node")))
_PUT_HOLD = _put_hold()
_CHARGE = (update(LANES).where(_lane_key(), LANES.c.charged_total == bindparam("k_before"),
                               LANES.c.reserved_at > bindparam("k_held_since", type_=LANES.c.reserved_at.type))
           .values(reserved=0, reserved_voucher_hash=None, reserved_at=None, reserved_by=None))
_DROP_HOLD = (update(LANES).where(_lane_key())
              .values(reserved=0, reserved_voucher_hash=None, reserved_at=None, reserved_by=None))
