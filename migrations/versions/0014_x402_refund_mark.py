"""x402_refund_mark: each channel's latest cooperative refund, its charged total and whether it was partial
(node/payment/x402/refund.py: a refund voucher that an earlier refund used refunds only the whole rest)

Revision ID: 0014
Revises: 0013
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from node.db.types import Amount

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("x402_channels") as batch:
        batch.add_column(sa.Column("refund_total", Amount(), nullable=True))
        batch.add_column(sa.Column("refund_was_partial", sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("x402_channels") as batch:
        batch.drop_column("refund_was_partial")
        batch.drop_column("refund_total")
