"""losses.recovered_epoch_id: the epoch that collected a lost receipt with its lane's next valid voucher

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("losses", schema=None) as batch_op:
        batch_op.add_column(sa.Column("recovered_epoch_id", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("losses", schema=None) as batch_op:
        batch_op.drop_column("recovered_epoch_id")
