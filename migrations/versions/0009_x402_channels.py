"""x402_channels: the batch-settlement channels paying a node, each a lane of its router (docs/x402.md)

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from node.db.base import BigId
from node.db.types import Address, Amount, Hash32, UTCDateTime

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "x402_channels",
        sa.Column("lane", BigId, primary_key=True, autoincrement=True),
        sa.Column("channel_id", Hash32(), nullable=False, unique=True),
        sa.Column("node", Address(), nullable=False),
        sa.Column("payer", Address(), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("signed_max", Amount(), nullable=False),
        sa.Column("signature", sa.String(132), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("x402_channels")
