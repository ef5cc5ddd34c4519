"""lane holds for requests in flight; response bodies kept for idempotent retries

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import node.db.types

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("lanes", schema=None) as batch_op:
        batch_op.add_column(sa.Column("reserved", node.db.types.Amount(precision=78, scale=0), nullable=False,
                                      server_default="0"))
        batch_op.add_column(sa.Column("reserved_voucher_hash", node.db.types.Hash32(length=66), nullable=True))
        batch_op.add_column(sa.Column("reserved_at", node.db.types.UTCDateTime(timezone=True), nullable=True))
    with op.batch_alter_table("lanes", schema=None) as batch_op:
        batch_op.alter_column("reserved", server_default=None)
    with op.batch_alter_table("vouchers", schema=None) as batch_op:
        batch_op.add_column(sa.Column("response", sa.JSON(none_as_null=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("vouchers", schema=None) as batch_op:
        batch_op.drop_column("response")
    with op.batch_alter_table("lanes", schema=None) as batch_op:
        batch_op.drop_column("reserved_at")
        batch_op.drop_column("reserved_voucher_hash")
        batch_op.drop_column("reserved")
