"""losses: what the node served but will not collect, per payer and lane, with its reason

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from node.db.types import Address, Amount, Hash32, UTCDateTime

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "losses",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("node", Address(), nullable=False),
        sa.Column("payer", Address(), nullable=False),
        sa.Column("lane", sa.BigInteger(), nullable=False),
        sa.Column("amount", Amount(), nullable=False),
        sa.Column("reason", sa.String(length=32), nullable=False),
        sa.Column("voucher_hash", Hash32(), nullable=True),
        sa.Column("epoch_id", sa.BigInteger(), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_losses")),
    )
    op.create_index(op.f("ix_losses_node_payer"), "losses", ["node", "payer"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_losses_node_payer"), table_name="losses")
    op.drop_table("losses")
