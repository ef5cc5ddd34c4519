"""the transaction manager's intents replace settlement_attempts; the outbox keeps the settle batch

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import node.db.types

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "tx_intents",
        sa.Column("key", sa.String(length=200), nullable=False),
        sa.Column("sender", node.db.types.Address(length=42), nullable=False),
        sa.Column("nonce", sa.BigInteger(), nullable=False),
        sa.Column("to", node.db.types.Address(length=42), nullable=False),
        sa.Column("data", sa.Text(), nullable=False),
        sa.Column("value", node.db.types.Amount(precision=78, scale=0), nullable=False),
        sa.Column("gas", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.JSON(), nullable=False),
        sa.Column("mined_hash", node.db.types.Hash32(length=66), nullable=True),
        sa.Column("mined_block", sa.BigInteger(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("updated_at", node.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_tx_intents")),
    )
    with op.batch_alter_table("tx_intents", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_tx_intents_sender_nonce"), ["sender", "nonce"], unique=False)
    with op.batch_alter_table("settlement_epochs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("batch", sa.JSON(), nullable=True))
    with op.batch_alter_table("settlement_attempts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_settlement_attempts_epoch_row_id"))
    op.drop_table("settlement_attempts")


def downgrade() -> None:
    op.create_table(
        "settlement_attempts",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("epoch_row_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("tx_hash", node.db.types.Hash32(length=66), nullable=False),
        sa.Column("nonce", sa.BigInteger(), nullable=False),
        sa.Column("max_fee_per_gas", node.db.types.Amount(precision=78, scale=0), nullable=False),
        sa.Column("max_priority_fee_per_gas", node.db.types.Amount(precision=78, scale=0), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("sent_at", node.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["epoch_row_id"], ["settlement_epochs.id"],
                                name=op.f("fk_settlement_attempts_epoch_row_id_settlement_epochs"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_settlement_attempts")),
        sa.UniqueConstraint("tx_hash", name=op.f("uq_settlement_attempts_tx_hash")),
    )
    with op.batch_alter_table("settlement_attempts", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_settlement_attempts_epoch_row_id"), ["epoch_row_id"], unique=False)
    with op.batch_alter_table("settlement_epochs", schema=None) as batch_op:
        batch_op.drop_column("batch")
    with op.batch_alter_table("tx_intents", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_tx_intents_sender_nonce"))
    op.drop_table("tx_intents")
