"""A payer opens lanes at will: a hold on one of them must not cost the node work that grows with the square
of the payer's lanes, on tables the planner has no statistics for yet (a freshly migrated node, or a big
import before autovacuum's ANALYZE). A plan that joined the payer's lanes to their collections and
write-offs with a filter instead of a key read every collection and write-off of the payer once per lane:
2,000 lanes took 1.4 s a hold, 5,000 took 8-10 s."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import psycopg

from node.db import queries
from node.db.loss import LossReason, LossRecord, record_loss
from node.db.models import Lane, Loss
from node.db.payment_models import LaneCollection
from node.db.session import make_engine, session_factory, upgrade
from node.payment.lane import NEW_LANE
from node.payment.lane_pg import _HOLD_VIEW, _TRY_HOLD, _WRITTEN_OFF, PipelinedLanes, hold_lock_key
from node.payment.lane_sqlite import SQLiteLanes
from tests.fixtures.database import _psycopg_dsn

PAYER = "0x" + "cd" * 20
NODE = "0x" + "ab" * 20
NOW = datetime(2026, 12, 5, 12, tzinfo=UTC)
LANES = 1_500
TABLES = ("lanes", "lane_collections", "losses")


def _payer_with_many_lanes(dsn: str) -> None:
    """LANES lanes, each charged 100, collected 50 and 10 of it written off; other payers' the same; no
    statistics (autovacuum off on these tables, no ANALYZE)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        for table in (*TABLES, "escrow_accounts", "vouchers"):
            conn.execute(f"ALTER TABLE {table} SET (autovacuum_enabled = false)")
        payers = "CASE WHEN p = 0 THEN %(payer)s ELSE '0x' || lpad(to_hex(p), 40, '0') END"
        rows = "FROM generate_series(0, 3) p, generate_series(1, %(lanes)s) l"
        params = {"payer": PAYER, "node": NODE, "lanes": LANES, "now": NOW}
        conn.execute(f"INSERT INTO lanes (payer, node, lane, charged_total, last_cumulative, reserved, updated_at) "
                     f"SELECT {payers}, %(node)s, l, 100, 100, 0, %(now)s {rows}", params)
        conn.execute(f"INSERT INTO lane_collections (payer, node, lane, collected, last_cumulative, is_final, "
                     f"block_number, updated_block) SELECT {payers}, %(node)s, l, 50, 50, true, 1, 1 {rows}", params)
        conn.execute(f"INSERT INTO losses (payer, node, lane, amount, epoch_id, created_at, reason) "
                     f"SELECT {payers}, %(node)s, l, 10, 1, %(now)s, %(reason)s {rows}",
                     {**params, "reason": _WRITTEN_OFF[0]})
        conn.execute("INSERT INTO escrow_accounts (payer, node, balance, thawing, deposited, withdrawn, collected, "
                     "pending_deposits, final_thawing, is_final, block_number, updated_block) "
                     "VALUES (%(payer)s, %(node)s, 1000000, 0, 1000000, 0, 0, 0, 0, true, 1, 1)", params)
        never_analyzed = conn.execute("SELECT count(*) FROM pg_stat_user_tables WHERE relname = ANY(%s) "
                                      "AND last_analyze IS NULL AND last_autoanalyze IS NULL",
                                      [list(TABLES)]).fetchone()
        assert never_analyzed == (len(TABLES),)


def _rows_read(dsn: str, statement: str, params: dict[str, object]) -> tuple[tuple[object, ...], int]:
    """The statement's row, and how many rows of the lane tables it read (its transaction's counters,
    statements inside a function included; a connection of its own: a backend's counters not yet flushed
    to the shared ones add up across its transactions)."""
    with psycopg.connect(dsn) as conn, conn.transaction(force_rollback=True):
        row = conn.execute(statement, params).fetchone()
        assert row is not None
        counted = conn.execute("SELECT sum(coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0)) "
                               "FROM pg_stat_xact_user_tables WHERE relname = ANY(%s)", [list(TABLES)]).fetchone()
    assert counted is not None
    return row, int(counted[0])


def test_a_hold_reads_the_payers_lanes_by_key_on_unanalyzed_tables(postgres_url: str) -> None:
    upgrade(postgres_url)
    dsn = _psycopg_dsn(postgres_url)
    _payer_with_many_lanes(dsn)
    live_since = NOW - timedelta(seconds=600)
    params: dict[str, object] = {
        "key": hold_lock_key(PAYER, NODE), "payer": PAYER, "node": NODE, "lane": 0, "voucher_hash": "0x" + "11" * 32,
        "live_since": live_since, "written_off": _WRITTEN_OFF, "is_fresh": True, "cumulative": 100, "max_fee": 100,
        "now": NOW, "owner": "api-a"}
    held, function_read = _rows_read(dsn, _TRY_HOLD, params)
    view, view_read = _rows_read(dsn, _HOLD_VIEW, params)
    # what the payer owes: (100 - 50 - 10) a lane, and the hold placed on it
    assert held[12] == view[12] == 40 * LANES and held[-1] is True
    # each of the payer's lanes, its collection and its write-offs read once (the old plan: 1,133,250 rows)
    assert function_read <= 4 * LANES, function_read
    assert view_read <= 4 * LANES, view_read


def test_the_hold_view_sums_a_payers_lanes_exactly(db_url: str) -> None:
    """The payer's totals summed in the database (on SQLite by exact functions over its amount strings)
    are what the lanes say, to the wei: amounts far above 2**63, collections, a charge collected past
    (never below zero), write-offs counted but not the losses still owed or already recovered, and only
    the live holds of the payer's other lanes."""
    upgrade(db_url)
    factory = session_factory(make_engine(db_url))
    big = 10**76
    live, expired = NOW - timedelta(seconds=5), NOW - timedelta(seconds=900)
    lanes = [  # lane, charged, collected, written off, (reserved, reserved_at)
        (0, 3 * big + 7, big, 0, (big + 1, live)),  # the lane asking: its own hold is not another's
        (1, 2 * big + 5, None, big, (5 * big, live)),
        (2, big, 2 * big, 0, (9, expired)),
        (3, 7, 3, 1, None),
        (4, 0, None, 0, (11, live)),
    ]
    with factory.begin() as s:
        for lane, charged, collected, _, hold in lanes:
            s.add(Lane(payer=PAYER, node=NODE, lane=lane, charged_total=charged, last_cumulative=charged,
                       reserved=hold[0] if hold else 0, reserved_voucher_hash=f"0x{lane + 1:064x}" if hold else None,
                       reserved_at=hold[1] if hold else None, reserved_by="api-a" if hold else None, updated_at=NOW))
            if collected is not None:
                s.add(LaneCollection(payer=PAYER, node=NODE, lane=lane, collected=collected, last_cumulative=collected,
                                     is_final=True, block_number=1, updated_block=1))
        s.flush()
        for lane, _, _, lost, _ in lanes:
            if lost:
                record_loss(s, LossRecord(NODE, PAYER, lane, lost, LossReason.SETTLE_REFUSED, epoch_id=1))
            for reason, recovered in ((LossReason.ESCROW_SHORT, None), (LossReason.SETTLE_REFUSED, 2)):
                s.add(Loss(node=NODE, payer=PAYER, lane=lane, amount=big, reason=reason.value, epoch_id=1,
                           recovered_epoch_id=recovered))
            record_loss(s, LossRecord(NODE, PAYER, lane, big, LossReason.DELIVERED_UNCHARGED))
        # another payer's lane counts for nothing
        s.add(Lane(payer="0x" + "ee" * 20, node=NODE, lane=0, charged_total=big, last_cumulative=big, reserved=big,
                   reserved_voucher_hash="0x" + "99" * 32, reserved_at=live, reserved_by="api-a", updated_at=NOW))
    expected_uncollected = (3 * big + 7 - big) + (2 * big + 5 - big) + 0 + (7 - 3 - 1) + 0
    engine = factory.kw["bind"]
    backend = SQLiteLanes(engine) if engine.dialect.name == "sqlite" else PipelinedLanes(engine)
    with backend.transaction() as tx:
        view = tx.hold_view(PAYER, NODE, 0, "0x" + "11" * 32, NOW - timedelta(seconds=600))
        empty = tx.hold_view("0x" + "01" * 20, NODE, 0, "0x" + "11" * 32, NOW - timedelta(seconds=600))
    assert (view.uncollected, view.other_holds) == (expected_uncollected, 5 * big + 11)
    assert (empty.uncollected, empty.other_holds, empty.lane) == (0, 0, NEW_LANE)
    with factory() as s:
        assert queries.uncollected(s, PAYER, NODE) == expected_uncollected
