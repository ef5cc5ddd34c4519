"""The ledger's lanes on PostgreSQL: a hold in one statement, a charge in one, each its own transaction
sent in autocommit mode (one round trip, no BEGIN or COMMIT of its own); psycopg's pipeline for the
transactions of several statements (the x402 router's holds, its refunds).

    hold:    SELECT * FROM loranode_try_hold(..)   -> the function (migration 0015) takes the (payer,
             node) advisory lock, then reads the hold view and writes the hold if node/payment/
             hold_rule.py's rule allows it (written again in SQL there); its commit does not wait
             for the WAL flush (a hold lost in a crash only means that request cannot be charged)
    charge:  one statement of data-modifying CTEs   -> then the WAL flush
             (the lane's UPDATE guarded by "the hold is still this voucher's", and the voucher and
             receipt INSERTs that run only if that UPDATE found its row)

Through SQLAlchemy the same work took 10 round trips (psycopg sends BEGIN on its own, then one per
statement) plus about 0.1 ms of Python per statement; in one pipelined transaction each (BEGIN, lock,
statement, COMMIT) 1 round trip but 0.3-0.4 ms of psycopg's Python for the hold; see docs/api.md. The
SQL is written out here, once: SQLite runs the same steps as Core statements (lane_sqlite.py), and the
ledger's tests run every step on both.

The connection comes from the engine's pool (its checkout ping applies). A lost connection is
reported as `DatabaseUnavailable` (503, nothing charged) and the pool is rebuilt, as SQLAlchemy does
for its own disconnects.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import psycopg
import sqlalchemy.exc
from eth_hash.auto import keccak
from psycopg.types.json import Json
from sqlalchemy import Engine

from node.db.loss import WRITTEN_OFF
from node.errors import DatabaseUnavailable
from node.json_codec import dumps
from node.payment.hold_rule import HoldRequest
from node.payment.lane import NEW_LANE, HoldView, LaneRow

_WRITTEN_OFF = [r.value for r in WRITTEN_OFF]
assert all(r.replace("_", "").isalpha() for r in _WRITTEN_OFF), "written into the SQL as literals"
# the reasons as a literal of the statements, not a parameter: psycopg builds a list dumper for a list
# parameter on every execute (a hold's execute took 25-32 us of CPU with it, 15 us without: the Python
# of the paid path's event loop and threads is what the engine cores lose on a box they share)
_WRITTEN_OFF_SQL = "ARRAY[" + ", ".join(f"'{r}'" for r in _WRITTEN_OFF) + "]::text[]"
_LOCK = "SELECT set_config('synchronous_commit', 'off', true), pg_advisory_xact_lock(%(key)s)"

# One row: the voucher's use, the escrow account, this lane, and the payer's lane totals.
_HOLD_VIEW = """
SELECT EXISTS (SELECT 1 FROM vouchers WHERE voucher_hash = %(voucher_hash)s) AS is_used,
       (SELECT response FROM vouchers WHERE voucher_hash = %(voucher_hash)s) AS response,
       e.balance, e.thawing, e.pending_deposits, e.pending_until_block, e.final_thawing,
       l.charged_total, l.last_cumulative, l.reserved_voucher_hash, l.reserved_at, l.reserved_by,
       t.uncollected, t.other_holds
FROM (SELECT 1) AS anchor
LEFT JOIN escrow_accounts e ON e.payer = %(payer)s AND e.node = %(node)s
LEFT JOIN lanes l ON l.payer = %(payer)s AND l.node = %(node)s AND l.lane = %(lane)s
CROSS JOIN (
    -- per lane, its collection and its write-offs (node/db/loss.py: WRITTEN_OFF) read by key
    -- alone (the write-off's conditions are in the sum, not the WHERE: on tables with no statistics yet the
    -- planner took an index on (node, recovered_epoch_id) and filtered the node's losses once per lane)
    SELECT coalesce(sum(greatest(
               x.charged_total
               - coalesce((SELECT c.collected FROM lane_collections c
                           WHERE c.payer = x.payer AND c.node = x.node AND c.lane = x.lane), 0)
               - coalesce((SELECT sum(CASE WHEN s.epoch_id IS NOT NULL AND s.recovered_epoch_id IS NULL
                                                AND s.reason = ANY({written_off}) THEN s.amount END)
                           FROM losses s WHERE s.node = x.node AND s.payer = x.payer AND s.lane = x.lane),
                          0), 0)), 0) AS uncollected,
           coalesce(sum(CASE WHEN x.lane <> %(lane)s AND x.reserved_voucher_hash IS NOT NULL
                                  AND x.reserved_at > %(live_since)s
                             THEN x.reserved ELSE 0 END), 0) AS other_holds
    FROM lanes x
    WHERE x.payer = %(payer)s AND x.node = %(node)s
) AS t
""".replace("{written_off}", _WRITTEN_OFF_SQL)

# The same row without the payer's totals: one lane, however many the payer has (HoldView's lane_view).
_LANE_VIEW = """
SELECT EXISTS (SELECT 1 FROM vouchers WHERE voucher_hash = %(voucher_hash)s) AS is_used,
       (SELECT response FROM vouchers WHERE voucher_hash = %(voucher_hash)s) AS response,
       l.charged_total, l.last_cumulative, l.reserved_voucher_hash, l.reserved_at, l.reserved_by
FROM (SELECT 1) AS anchor
LEFT JOIN lanes l ON l.payer = %(payer)s AND l.node = %(node)s AND l.lane = %(lane)s
"""
_PUT_HOLD = """
INSERT INTO lanes (payer, node, lane, charged_total, last_cumulative, reserved, reserved_voucher_hash,
                   reserved_at, reserved_by, updated_at)
VALUES (%(payer)s, %(node)s, %(lane)s, 0, 0, %(max_fee)s::numeric, %(voucher_hash)s, %(now)s, %(owner)s, %(now)s)
ON CONFLICT (payer, node, lane) DO UPDATE
SET reserved = excluded.reserved, reserved_voucher_hash = excluded.reserved_voucher_hash,
    reserved_at = excluded.reserved_at, reserved_by = excluded.reserved_by, updated_at = excluded.updated_at
"""

# The hold in one statement, under the (payer, node) lock: migration 0015's function, which mirrors
# hold_rule.refusal check for check (the ledger checks the same view in Python and raises what the rule
# names; both must agree: tests/payment/test_hold_rule.py).
_TRY_HOLD = """
SELECT * FROM loranode_try_hold(%(key)s, %(payer)s, %(node)s, %(lane)s, %(voucher_hash)s, %(live_since)s,
                                {written_off}, %(is_fresh)s, %(cumulative)s, %(max_fee)s, %(now)s, %(owner)s)
""".replace("{written_off}", _WRITTEN_OFF_SQL)

# The charge: nothing is written unless the lane's UPDATE finds the hold still ours and the lane not
# charged since (then the statement reports 0 rows). The receipt's foreign key to its voucher is
# checked at the end of the statement, after both INSERTs.
_CHARGE = """
WITH charged AS (
    UPDATE lanes
    SET charged_total = %(charged_total)s::numeric, last_cumulative = %(cumulative)s::numeric,
        last_voucher_hash = %(voucher_hash)s, reserved = 0, reserved_voucher_hash = NULL, reserved_at = NULL,
        reserved_by = NULL, updated_at = %(created_at)s
    WHERE payer = %(payer)s AND node = %(node)s AND lane = %(lane)s
      AND reserved_voucher_hash = %(voucher_hash)s AND reserved_by = %(owner)s
      AND charged_total = %(charged_before)s::numeric AND reserved_at > %(held_since)s
    RETURNING 1
), voucher AS (
    INSERT INTO vouchers (voucher_hash, payer, node, lane, cumulative, request_hash, deadline, signature,
                          charged_total, response, created_at)
    SELECT %(voucher_hash)s, %(payer)s, %(node)s, %(lane)s, %(cumulative)s::numeric, %(request_hash)s,
           %(deadline)s, %(signature)s, %(charged_total)s::numeric, %(response)s, %(created_at)s
    FROM charged
)
INSERT INTO receipts (receipt_hash, voucher_hash, node, adapter_id, registry_block, lineage_hash, prompt_tokens,
                      completion_tokens, fee, output_hash, method, signature, attribution, created_at)
SELECT %(receipt_hash)s, %(voucher_hash)s, %(node)s, %(adapter_id)s, %(registry_block)s, %(lineage_hash)s,
       %(prompt_tokens)s, %(completion_tokens)s, %(fee)s::numeric, %(output_hash)s, %(method)s,
       %(receipt_signature)s, %(attribution)s, %(created_at)s
FROM charged
"""

_DROP_HOLD = """
UPDATE lanes SET reserved = 0, reserved_voucher_hash = NULL, reserved_at = NULL, reserved_by = NULL
WHERE payer = %(payer)s AND node = %(node)s AND lane = %(lane)s AND reserved_voucher_hash = %(voucher_hash)s
  AND reserved_by = %(owner)s
"""


def _hold_view(row: tuple[Any, ...]) -> HoldView:
    (is_used, response, balance, thawing, pending, pending_until, final_thawing, charged_total, last_cumulative,
     reserved_hash, reserved_at, reserved_by, uncollected, other_holds) = row
    this = NEW_LANE if charged_total is None else LaneRow(int(charged_total), int(last_cumulative),
                                                          reserved_hash, reserved_at, reserved_by)
    return HoldView(is_used=is_used, response=response, lane=this, balance=int(balance or 0),
                    thawing=int(thawing or 0), uncollected=int(uncollected), other_holds=int(other_holds),
                    pending_deposits=int(pending or 0), pending_until_block=pending_until,
                    final_thawing=int(final_thawing or 0))


def _charge_params(voucher: dict[str, Any], receipt: dict[str, Any], charged_before: int, held_since: datetime,
                   owner: str) -> dict[str, Any]:
    return {**receipt, **voucher, "receipt_signature": receipt["signature"], "charged_before": charged_before,
            "held_since": held_since, "owner": owner,
            "response": Json(voucher["response"], dumps) if voucher["response"] is not None else None,
            "attribution": Json(receipt["attribution"], dumps) if receipt["attribution"] is not None else None}


def hold_lock_key(payer: str, node: str, lane: int | None = None) -> int:
    """The (payer, node) advisory lock's key, or with `lane` that lane's: 8 bytes of keccak, as a signed
    bigint."""
    name = f"lanes:{payer}:{node}" if lane is None else f"lane:{payer}:{node}:{lane}"
    return int.from_bytes(keccak(name.encode())[:8], "big", signed=True)


class PipelinedLaneTransaction:
    """One transaction on a psycopg connection in pipeline mode: statements are queued and sent
    together; a read (`hold_view`) is the only point that waits for the server before COMMIT.
    BEGIN and COMMIT are statements of the pipeline too (the connection is in autocommit mode while
    it runs this transaction: psycopg's own BEGIN would wait for its answer, one more round trip)."""

    def __init__(self, conn: psycopg.Connection[Any], pipeline: psycopg.Pipeline) -> None:
        self.conn = conn
        self.pipeline = pipeline
        self.is_committed = False

    def commit(self) -> None:
        self.conn.execute("COMMIT")
        self.pipeline.sync()
        self.is_committed = True

    def lock(self, payer: str, node: str, lane: int | None = None) -> None:
        self.conn.execute(_LOCK, {"key": hold_lock_key(payer, node, lane)})

    def hold_view(self, payer: str, node: str, lane: int, voucher_hash: str, live_since: datetime) -> HoldView:
        row = self.conn.execute(_HOLD_VIEW, {"payer": payer, "node": node, "lane": lane,
                                             "voucher_hash": voucher_hash, "live_since": live_since}).fetchone()
        assert row is not None, "the hold view has one row (a one-row anchor, left joins)"
        return _hold_view(row)

    def lane_view(self, payer: str, node: str, lane: int, voucher_hash: str) -> HoldView:
        row = self.conn.execute(_LANE_VIEW, {"payer": payer, "node": node, "lane": lane,
                                             "voucher_hash": voucher_hash}).fetchone()
        assert row is not None, "the lane view has one row (a one-row anchor, left joins)"
        is_used, response, charged_total, last_cumulative, reserved_hash, reserved_at, reserved_by = row
        this = NEW_LANE if charged_total is None else LaneRow(int(charged_total), int(last_cumulative),
                                                              reserved_hash, reserved_at, reserved_by)
        return HoldView(is_used=is_used, response=response, lane=this, balance=0, thawing=0, uncollected=0,
                        other_holds=0)

    def put_hold(self, payer: str, node: str, lane: int, max_fee: int, voucher_hash: str, now: datetime,
                 owner: str) -> None:
        self.conn.execute(_PUT_HOLD, {"payer": payer, "node": node, "lane": lane, "max_fee": max_fee,
                                      "voucher_hash": voucher_hash, "now": now, "owner": owner})

    def charge(self, voucher: dict[str, Any], receipt: dict[str, Any], charged_before: int,
               held_since: datetime, owner: str) -> bool:
        cur = self.conn.execute(_CHARGE, _charge_params(voucher, receipt, charged_before, held_since, owner))
        self.commit()  # queued behind the statement: its rowcount is known after this one sync
        return cur.rowcount == 1

    def drop_hold(self, payer: str, node: str, lane: int, voucher_hash: str, owner: str) -> None:
        self.conn.execute(_DROP_HOLD, {"payer": payer, "node": node, "lane": lane, "voucher_hash": voucher_hash,
                                       "owner": owner})


class PipelinedLanes:
    """Transactions for the ledger's paid path on a PostgreSQL engine."""

    def __init__(self, engine: Engine) -> None:
        assert engine.dialect.name == "postgresql" and engine.dialect.driver == "psycopg"
        self.engine = engine

    def hold(self, r: HoldRequest) -> tuple[HoldView, bool]:
        with self._autocommit() as conn:
            row = conn.execute(_TRY_HOLD, {
                "key": hold_lock_key(r.payer, r.node), "payer": r.payer, "node": r.node, "lane": r.lane,
                "voucher_hash": r.voucher_hash, "live_since": r.live_since,
                "is_fresh": r.is_fresh, "cumulative": r.cumulative, "max_fee": r.max_fee, "now": r.now,
                "owner": r.owner}).fetchone()
        assert row is not None, "the hold view has one row (a one-row anchor, left joins)"
        return _hold_view(row[:-1]), bool(row[-1])

    def charge(self, voucher: dict[str, Any], receipt: dict[str, Any], charged_before: int,
               held_since: datetime, owner: str) -> bool:
        with self._autocommit() as conn:
            cur = conn.execute(_CHARGE, _charge_params(voucher, receipt, charged_before, held_since, owner))
            return cur.rowcount == 1

    def drop_hold(self, payer: str, node: str, lane: int, voucher_hash: str, owner: str) -> None:
        with self._autocommit() as conn:
            conn.execute(_DROP_HOLD, {"payer": payer, "node": node, "lane": lane, "voucher_hash": voucher_hash,
                                      "owner": owner})

    @contextmanager
    def transaction(self, lock_payer: str | None = None, node: str = "",
                    lock_lane: int | None = None) -> Iterator[PipelinedLaneTransaction]:
        """A transaction; with `lock_payer`, a hold's: under the (payer, node) lock, without waiting
        for its commit's WAL flush. Commits when the block ends (if `charge` has not already)."""
        with self._autocommit() as conn, conn.pipeline() as pipeline:
            conn.execute("BEGIN")
            tx = PipelinedLaneTransaction(conn, pipeline)
            if lock_payer is not None:
                tx.lock(lock_payer, node, lock_lane)
            yield tx
            if not tx.is_committed:
                tx.commit()

    @contextmanager
    def _autocommit(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection in autocommit mode: each statement is its own transaction (a block that
        sends BEGIN is one transaction, rolled back if the block raises)."""
        try:
            pooled = self.engine.raw_connection()
        except (psycopg.OperationalError, sqlalchemy.exc.OperationalError) as exc:  # the server is not there
            raise DatabaseUnavailable("the node's database is not available; retry shortly",
                                      error=type(exc).__name__) from exc
        conn: psycopg.Connection[Any] = pooled.driver_connection  # type: ignore[assignment]
        try:
            conn.autocommit = True
            yield conn
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            self._lost(pooled, conn, exc)
            raise DatabaseUnavailable("the node's database is not available; retry shortly",
                                      error=type(exc).__name__) from exc
        except BaseException:
            if not conn.closed and conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                conn.execute("ROLLBACK")
            raise
        finally:
            if not conn.closed:
                conn.autocommit = False  # as the pool hands its connections out
            pooled.close()

    def _lost(self, pooled: Any, conn: psycopg.Connection[Any], exc: psycopg.Error) -> None:
        """Drop this connection; on a disconnect, every pooled one (the server went away)."""
        is_disconnect = self.engine.dialect.is_disconnect(exc, conn, None)  # type: ignore[arg-type]
        pooled.invalidate(exc)  # (asked first: invalidating detaches the driver connection)
        if is_disconnect:
            self.engine.dispose()
