"""final_thawing: escrow accounts carry what was thawing as of the last final block (less what was
withdrawn since) and when it ends; the hold counts the larger of it and `thawing` (node/payment/
hold_rule.py), settlement's lane order the sooner end (node/settlement/outbox.py); x402 channels the
same of their pending withdrawal (`final_pending_withdrawal`, `final_withdraw_ready_at`)

A thaw cancelled in a block that was not final yet freed its escrow at once: a reorg that dropped the
cancel brought back a thaw that had ended, and the payer withdrew what the node had served against it
(tests/adversarial/test_thaw_cancel_reorg.py; a channel's withdrawal lowered, the same:
tests/settlement/test_x402_guard.py). Rows take their current values here (exact for every final row;
the indexer replays the others' at its next finalized block). `loranode_try_hold` is created again with
the rule (its result has one more column, so it is dropped first).

Revision ID: 0012
Revises: 0011
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import sqlalchemy as sa
from alembic import op

from node.db.types import Amount, UTCDateTime

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DROP_TRY_HOLD = ("DROP FUNCTION IF EXISTS loranode_try_hold(bigint, text, text, bigint, text, timestamptz, text[], "
                 "boolean, numeric, numeric, timestamptz, text)")

# migration 0011's function, with the escrow's `final_thawing` read, counted and returned
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
            SELECT coalesce(sum(greatest(x.charged_total - coalesce(c.collected, 0) - coalesce(w.amount, 0), 0)), 0)
                       AS uncollected,
                   coalesce(sum(CASE WHEN x.lane <> p_lane AND x.reserved_voucher_hash IS NOT NULL
                                          AND x.reserved_at > p_live_since
                                     THEN x.reserved ELSE 0 END), 0) AS other_holds
            FROM lanes x
            LEFT JOIN lane_collections c ON c.payer = x.payer AND c.node = x.node AND c.lane = x.lane
            LEFT JOIN (  -- settlement losses that can never be collected (node/db/loss.py: WRITTEN_OFF)
                SELECT s.lane, sum(s.amount) AS amount FROM losses s
                WHERE s.payer = p_payer AND s.node = p_node AND s.epoch_id IS NOT NULL
                  AND s.recovered_epoch_id IS NULL AND s.reason = ANY(p_written_off)
                GROUP BY s.lane
            ) AS w ON w.lane = x.lane
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
    with op.batch_alter_table("escrow_accounts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("final_thawing", Amount(precision=78, scale=0), nullable=False,
                                      server_default="0"))
        batch_op.add_column(sa.Column("final_thaw_end_at", UTCDateTime(timezone=True), nullable=True))
    op.execute("UPDATE escrow_accounts SET final_thawing = thawing, final_thaw_end_at = thaw_end_at")
    with op.batch_alter_table("channel_accounts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("final_pending_withdrawal", Amount(precision=78, scale=0), nullable=False,
                                      server_default="0"))
        batch_op.add_column(sa.Column("final_withdraw_ready_at", UTCDateTime(timezone=True), nullable=True))
    op.execute("UPDATE channel_accounts SET final_pending_withdrawal = pending_withdrawal, "
               "final_withdraw_ready_at = withdraw_ready_at")
    if op.get_bind().dialect.name == "postgresql":
        op.execute(DROP_TRY_HOLD)
        op.execute(TRY_HOLD)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(DROP_TRY_HOLD)
        op.execute(_previous_try_hold())
    with op.batch_alter_table("channel_accounts", schema=None) as batch_op:
        batch_op.drop_column("final_withdraw_ready_at")
        batch_op.drop_column("final_pending_withdrawal")
    with op.batch_alter_table("escrow_accounts", schema=None) as batch_op:
        batch_op.drop_column("final_thaw_end_at")
        batch_op.drop_column("final_thawing")


def _previous_try_hold() -> str:
    """Migration 0011's function, read from its file (a revision's module name starts with a digit)."""
    path = Path(__file__).with_name("0011_try_hold_function.py")
    spec = importlib.util.spec_from_file_location("try_hold_0011", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return str(module.TRY_HOLD)
