"""channel_accounts: the indexer's mirror of the x402 channel contract (docs/x402.md)

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from node.db.types import Address, Amount, Hash32, UTCDateTime

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "channel_accounts",
        sa.Column("channel_id", Hash32(), nullable=False),
        sa.Column("payer", Address(), nullable=False),
        sa.Column("receiver", Address(), nullable=True),
        sa.Column("balance", Amount(), nullable=False),
        sa.Column("total_claimed", Amount(), nullable=False),
        sa.Column("deposited", Amount(), nullable=False),
        sa.Column("refunded", Amount(), nullable=False),
        sa.Column("withdrawn", Amount(), nullable=False),
        sa.Column("pending_withdrawal", Amount(), nullable=False),
        sa.Column("withdraw_ready_at", UTCDateTime(), nullable=True),
        sa.Column("refund_nonce", sa.BigInteger(), nullable=False),
        sa.Column("pending_deposits", Amount(), nullable=False),
        sa.Column("pending_until_block", sa.BigInteger(), nullable=True),
        sa.Column("block_number", sa.BigInteger(), nullable=False),
        sa.Column("updated_block", sa.BigInteger(), nullable=False),
        sa.Column("is_final", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("channel_id", name=op.f("pk_channel_accounts")),
    )
    with op.batch_alter_table("channel_accounts", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_channel_accounts_is_final_updated_block"),
                              ["is_final", "updated_block"], unique=False)


def downgrade() -> None:
    op.drop_table("channel_accounts")
