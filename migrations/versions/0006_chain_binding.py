"""the mirror is bound to one chain (genesis hash with the cursor) and says how healthy it is;
escrow accounts carry their deposits that are not final yet

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import node.db.types

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CURSOR_COLUMNS = ("genesis_hash", "head_block", "checked_at", "stalled_reason", "halted_reason")


def upgrade() -> None:
    with op.batch_alter_table("indexer_cursor", schema=None) as batch_op:
        batch_op.add_column(sa.Column("genesis_hash", node.db.types.Hash32(length=66), nullable=True))
        batch_op.add_column(sa.Column("head_block", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("checked_at", node.db.types.UTCDateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("stalled_reason", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("halted_reason", sa.Text(), nullable=True))
    with op.batch_alter_table("escrow_accounts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("pending_deposits", node.db.types.Amount(precision=78, scale=0),
                                      nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("pending_until_block", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("escrow_accounts", schema=None) as batch_op:
        batch_op.drop_column("pending_until_block")
        batch_op.drop_column("pending_deposits")
    with op.batch_alter_table("indexer_cursor", schema=None) as batch_op:
        for name in reversed(CURSOR_COLUMNS):
            batch_op.drop_column(name)
