"""hold by key: `loranode_try_hold` reads each of the payer's lanes' collection and write-offs by key

Migration 0012's function summed the payer's lanes outer-joined to their collections and to their
write-offs grouped by lane. On tables with no statistics yet (a freshly migrated node, a big import before
autovacuum's ANALYZE) PostgreSQL planned both as nested loops with a join filter: every collection and
write-off of the payer read once per lane, a hold on a payer with 2,000 lanes 1.4 s, with 5,000 8-10 s
(tests/payment/test_hold_many_lanes.py). Each lane's collection and write-offs are now correlated
subqueries on their keys (the primary key of lane_collections, losses' (node, payer, lane) index), as
node/db/queries.py's `uncollected` does; the function's arguments and result are unchanged.

Revision ID: 0015
Revises: 0014
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

from alembic import op

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# migration 0012's function, the payer's totals read lane by lane
TRY_HOLD = """
CREATE OR REPLACE FUNCTION loranode_try_hold(
    p_lock_key bigint, p_payer text, p_node text, p_lane bigint, p_voucher_hash text, p_live_since timestamptz,
    p_written_off text[], p_is_fresh boolean, p_cumulative numeric, p_max_fee numeric, p_now timestamptz,
    p_owner text)
RETURNS TABLE (is_used boolean, response json, balance numeric, thawing numeric, pending_deposits numeric,
               pending_until_block bigint, final_thawing numeric, charged_total numeric, last_cumulative numeric,
               reserved_voucher_hash text, reserved_at timestamptz, reserved_by text, uncollected numeric,
               other_holds numeric, is_held boolean)
LANGUAGE plpgsql VOLATILE AS $fn$
#variable_conflict use_column
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    PERFORM pg_advisory_xact_lock(p_lock_key);
    RETURN QUERY
    WITH v AS (
        SELECT EXISTS (SELECT 1 FROM vouchers WHERE voucher_hash = p_voucher_hash) AS is_used,
               (SELECT u.response FROM vouchers u WHERE u.voucher_hash = p_voucher_hash) AS response,
               e.balance, e.thawing, e.pending_deposits, e.pending_until_block, e.final_thawing,
               l.charged_total, l.last_cumulative, l.reserved_voucher_hash, l.reserved_at, l.reserved_by,
               t.uncollected, t.other_holds
        FROM (SELECT 1) AS anchor
        LEFT JOIN escrow_accounts e ON e.payer = p_payer AND e.node = p_node
        LEFT JOIN lanes l ON l.payer = p_payer AND l.node = p_node AND l.lane = p_lane
        CROSS JOIN (
            -- per lane, its collection and its write-offs (node/db/loss.py: WRITTEN_OFF) read by
            -- key alone (the write-off's conditions are in the sum, not the WHERE: on tables with no statistics
            -- yet the planner took an index on (node, recovered_epoch_id) and filtered the node's losses once
            -- per lane)
            SELECT coalesce(sum(greatest(
                       x.charged_total
                       - coalesce((SELECT c.collected FROM lane_collections c
                                   WHERE c.payer = x.payer AND c.node = x.node AND c.lane = x.lane), 0)
                       - coalesce((SELECT sum(CASE WHEN s.epoch_id IS NOT NULL AND s.recovered_epoch_id IS NULL
                                                        AND s.reason = ANY(p_written_off) THEN s.amount END)
                                   FROM losses s WHERE s.node = x.node AND s.payer = x.payer AND s.lane = x.lane),
                                  0), 0)), 0) AS uncollected,
                   coalesce(sum(CASE WHEN x.lane <> p_lane AND x.reserved_voucher_hash IS NOT NULL
                                          AND x.reserved_at > p_live_since
                                     THEN x.reserved ELSE 0 END), 0) AS other_holds
            FROM lanes x
            WHERE x.payer = p_payer AND x.node = p_node
        ) AS t
    ),
    held AS (
        INSERT INTO lanes AS h (payer, node, lane, charged_total, last_cumulative, reserved, reserved_voucher_hash,
                                reserved_at, reserved_by, updated_at)
        SELECT p_payer, p_node, p_lane, 0, 0, p_max_fee, p_voucher_hash, p_now, p_owner, p_now
        FROM v
        WHERE NOT v.is_used AND p_is_fresh
          AND (coalesce(v.reserved_voucher_hash, '') = '' OR v.reserved_at IS NULL OR v.reserved_at <= p_live_since
               OR (v.reserved_voucher_hash = p_voucher_hash AND v.reserved_by = p_owner))
          AND p_cumulative >= coalesce(v.last_cumulative, 0)
          AND p_cumulative >= coalesce(v.charged_total, 0) + p_max_fee
          AND greatest(coalesce(v.balance, 0) - coalesce(v.pending_deposits, 0)
                       - greatest(coalesce(v.thawing, 0), coalesce(v.final_thawing, 0)) - v.uncollected, 0)
              - v.other_holds >= p_max_fee
        ON CONFLICT (payer, node, lane) DO UPDATE
        SET reserved = excluded.reserved, reserved_voucher_hash = excluded.reserved_voucher_hash,
            reserved_at = excluded.reserved_at, reserved_by = excluded.reserved_by, updated_at = excluded.updated_at
        RETURNING 1
    )
    SELECT v.is_used, v.response::json, v.balance::numeric, v.thawing::numeric, v.pending_deposits::numeric,
           v.pending_until_block::bigint, v.final_thawing::numeric, v.charged_total::numeric,
           v.last_cumulative::numeric, v.reserved_voucher_hash::text, v.reserved_at::timestamptz, v.reserved_by::text,
           v.uncollected::numeric, v.other_holds::numeric, EXISTS (SELECT 1 FROM held)
    FROM v;
END
$fn$
"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(TRY_HOLD)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_previous_try_hold())


def _previous_try_hold() -> str:
    """Migration 0012's function, read from its file (a revision's module name starts with a digit)."""
    path = Path(__file__).with_name("0012_final_thawing.py")
    spec = importlib.util.spec_from_file_location("final_thawing_0012", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return str(module.TRY_HOLD)
