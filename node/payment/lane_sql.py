"""The ledger's SQL: SQLAlchemy Core, one statement per step, so a hold and a charge each cost
three statements (and their transaction) on the paid path.

    hold:    lock_for_hold (payer, node)  ->  read_hold_view  ->  put_hold   (INSERT .. ON CONFLICT)
    charge:  charge_lane (UPDATE .. WHERE the hold is still ours)  ->  insert voucher  ->  insert receipt

Money columns are `Amount`: NUMERIC on PostgreSQL, a zero-padded string on SQLite (node/db/types.py),
so only PostgreSQL can add amounts up in SQL. `_lane_totals` is the one place where the dialects
differ: one aggregate inside the hold view on PostgreSQL, the lanes' rows summed in Python on SQLite.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from eth_hash.auto import keccak
from sqlalchemy import (
    Connection,
    and_,
    bindparam,
    case,
    exists,
    func,
    insert,
    literal_column,
    select,
    text,
    true,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql import Select

from node.db.models import EscrowAccount, Lane, LaneCollection, Receipt, Voucher
from node.db.types import Amount

LANES = Lane.__table__
COLLECTIONS = LaneCollection.__table__
ESCROW = EscrowAccount.__table__
VOUCHERS = Voucher.__table__
RECEIPTS = Receipt.__table__


@dataclass(frozen=True)
class LaneRow:
    charged_total: int
    last_cumulative: int
    reserved_voucher_hash: str | None
    reserved_at: datetime | None


NEW_LANE = LaneRow(0, 0, None, None)


@dataclass(frozen=True)
class HoldView:
    """What `reserve` decides on, read under the (payer, node) lock."""

    is_used: bool  # the voucher was accepted before
    response: dict[str, Any] | None  # the response it bought, while within the idempotency window
    lane: LaneRow  # the voucher's lane (NEW_LANE if never used)
    balance: int  # escrow, as mirrored
    thawing: int
    uncollected: int  # charged on all lanes of (payer, node), not yet collected on chain
    other_holds: int  # the live holds on the other lanes


def lock_for_hold(conn: Connection, payer: str, node: str) -> None:
    """PostgreSQL: take the transaction-scoped (payer, node) lock shared by every API process, and let
    this transaction commit without waiting for its WAL flush (one statement). A hold is transient: if
    the server crashes before the flush and forgets it, the request cannot be charged (`charge_lane`
    finds no hold) and a later durable commit flushes it first anyway. The charge stays durable.
    (SQLite callers serialise on a process lock instead.)"""
    key = int.from_bytes(keccak(f"lanes:{payer}:{node}".encode())[:8], "big", signed=True)
    conn.execute(_LOCK_FOR_HOLD, {"key": key})


def read_hold_view(conn: Connection, payer: str, node: str, lane: int, voucher_hash: str,
                   live_since: datetime) -> HoldView:
    """The voucher's use, the lane, the escrow and the lane totals: one statement on PostgreSQL."""
    params = {"payer": payer, "node": node, "lane": lane, "voucher_hash": voucher_hash, "live_since": live_since}
    if conn.dialect.name == "postgresql":
        row = conn.execute(_HOLD_VIEW_WITH_TOTALS, params).one()
        uncollected, other_holds = row.uncollected, row.other_holds
    else:
        row = conn.execute(_HOLD_VIEW, params).one()
        uncollected, other_holds = _lane_totals_python(conn, params)
    this = NEW_LANE if row.charged_total is None else LaneRow(row.charged_total, row.last_cumulative,
                                                              row.reserved_voucher_hash, row.reserved_at)
    return HoldView(is_used=row.is_used, response=row.response, lane=this, balance=row.balance or 0,
                    thawing=row.thawing or 0, uncollected=uncollected, other_holds=other_holds)


def _lane_totals_python(conn: Connection, params: dict[str, Any]) -> tuple[int, int]:
    """SQLite: (uncollected, other_holds) summed over the payer's lane rows."""
    rows = conn.execute(_LANE_ROWS, params).all()
    uncollected = sum(max(r.charged_total - (r.collected or 0), 0) for r in rows)
    holds = sum(r.reserved for r in rows if r.lane != params["lane"] and r.reserved_voucher_hash
                and r.reserved_at and r.reserved_at > params["live_since"])
    return uncollected, holds


def put_hold(conn: Connection, payer: str, node: str, lane: int, max_fee: int, voucher_hash: str,
             now: datetime) -> None:
    """Hold `max_fee` on the lane for `voucher_hash`, creating the lane on first use."""
    stmt = _PUT_HOLD_PG if conn.dialect.name == "postgresql" else _PUT_HOLD_SQLITE
    conn.execute(stmt, {"payer": payer, "node": node, "lane": lane, "charged_total": 0, "last_cumulative": 0,
                        "reserved": max_fee, "reserved_voucher_hash": voucher_hash, "reserved_at": now,
                        "updated_at": now})


def charge_lane(conn: Connection, payer: str, node: str, lane: int, voucher_hash: str, charged_before: int,
                charged_total: int, cumulative: int, now: datetime) -> bool:
    """Turn the lane's hold into its charge; False if the hold is no longer this voucher's (it
    expired and was taken over) or the lane was charged since (then nothing is written)."""
    result = conn.execute(_CHARGE, {"k_payer": payer, "k_node": node, "k_lane": lane, "k_hash": voucher_hash,
                                    "k_before": charged_before, "charged_total": charged_total,
                                    "last_cumulative": cumulative, "last_voucher_hash": voucher_hash,
                                    "updated_at": now})
    return result.rowcount == 1


def drop_hold(conn: Connection, payer: str, node: str, lane: int, voucher_hash: str) -> None:
    """Release the lane's hold if it is still `voucher_hash`'s."""
    conn.execute(_DROP_HOLD, {"k_payer": payer, "k_node": node, "k_lane": lane, "k_hash": voucher_hash})


def insert_voucher(conn: Connection, row: dict[str, Any]) -> None:
    conn.execute(_INSERT_VOUCHER, row)


def insert_receipt(conn: Connection, row: dict[str, Any]) -> None:
    conn.execute(_INSERT_RECEIPT, row)


def forget_responses(conn: Connection, created_before: datetime) -> int:
    """Null the stored response bodies of vouchers accepted before `created_before`."""
    result = conn.execute(update(VOUCHERS)
                          .where(VOUCHERS.c.created_at < created_before, VOUCHERS.c.response.is_not(None))
                          .values(response=None))
    return result.rowcount


# --- the statements, built once (named parameters; SQLAlchemy caches their compiled form) ----------
def _hold_view() -> Select[Any]:
    """One row, left-joined from a one-row anchor: the voucher's use, the escrow account, this lane."""
    payer, node, voucher_hash = bindparam("payer"), bindparam("node"), bindparam("voucher_hash")
    anchor = select(literal_column("1").label("one")).subquery("anchor")
    this = LANES.alias("this_lane")
    return (select(exists().where(VOUCHERS.c.voucher_hash == voucher_hash).label("is_used"),
                   select(VOUCHERS.c.response).where(VOUCHERS.c.voucher_hash == voucher_hash)
                   .scalar_subquery().label("response"),
                   ESCROW.c.balance, ESCROW.c.thawing, this.c.charged_total, this.c.last_cumulative,
                   this.c.reserved_voucher_hash, this.c.reserved_at)
            .select_from(anchor.outerjoin(ESCROW, and_(ESCROW.c.payer == payer, ESCROW.c.node == node))
                         .outerjoin(this, and_(this.c.payer == payer, this.c.node == node,
                                               this.c.lane == bindparam("lane")))))


def _payer_lanes() -> Any:
    """The payer's lanes with what the chain collected on each (a FROM clause)."""
    return LANES.outerjoin(COLLECTIONS, and_(COLLECTIONS.c.payer == LANES.c.payer, COLLECTIONS.c.node == LANES.c.node,
                                             COLLECTIONS.c.lane == LANES.c.lane))


def _lane_totals_sql() -> Any:
    """PostgreSQL: (uncollected, other_holds) over the payer's lanes, as one aggregate row."""
    owed = func.greatest(LANES.c.charged_total - func.coalesce(COLLECTIONS.c.collected, 0), 0)
    is_live = and_(LANES.c.lane != bindparam("lane"), LANES.c.reserved_voucher_hash.is_not(None),
                   LANES.c.reserved_at > bindparam("live_since"))
    held = case((is_live, LANES.c.reserved), else_=0)
    return (select(func.coalesce(func.sum(owed), 0, type_=Amount()).label("uncollected"),
                   func.coalesce(func.sum(held), 0, type_=Amount()).label("other_holds"))
            .select_from(_payer_lanes())
            .where(LANES.c.payer == bindparam("payer"), LANES.c.node == bindparam("node")).subquery("totals"))


def _put_hold(dialect_insert: Any) -> Any:
    stmt = dialect_insert(LANES)
    held = ("reserved", "reserved_voucher_hash", "reserved_at", "updated_at")
    return stmt.on_conflict_do_update(index_elements=[LANES.c.payer, LANES.c.node, LANES.c.lane],
                                      set_={c: stmt.excluded[c] for c in held})


def _lane_key() -> Any:
    return and_(LANES.c.payer == bindparam("k_payer"), LANES.c.node == bindparam("k_node"),
                LANES.c.lane == bindparam("k_lane"), LANES.c.reserved_voucher_hash == bindparam("k_hash"))


_LOCK_FOR_HOLD = text("SELECT set_config('synchronous_commit', 'off', true), pg_advisory_xact_lock(:key)")
_HOLD_VIEW = _hold_view()
_TOTALS = _lane_totals_sql()
_HOLD_VIEW_WITH_TOTALS = _HOLD_VIEW.add_columns(_TOTALS.c.uncollected, _TOTALS.c.other_holds).join(_TOTALS, true())
_LANE_ROWS = (select(LANES.c.lane, LANES.c.charged_total, LANES.c.reserved, LANES.c.reserved_voucher_hash,
                     LANES.c.reserved_at, COLLECTIONS.c.collected)
              .select_from(_payer_lanes())
              .where(LANES.c.payer == bindparam("payer"), LANES.c.node == bindparam("node")))
_PUT_HOLD_PG = _put_hold(postgresql.insert)
_PUT_HOLD_SQLITE = _put_hold(sqlite.insert)
_CHARGE = (update(LANES).where(_lane_key(), LANES.c.charged_total == bindparam("k_before"))
           .values(reserved=0, reserved_voucher_hash=None, reserved_at=None))
_DROP_HOLD = update(LANES).where(_lane_key()).values(reserved=0, reserved_voucher_hash=None, reserved_at=None)
_INSERT_VOUCHER = insert(VOUCHERS)
_INSERT_RECEIPT = insert(RECEIPTS)
