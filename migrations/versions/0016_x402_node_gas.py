"""x402_node_gas: the gas the node spent on each channel's gasless transactions (its deposits, and its
cooperative refunds at their estimate): a gasless refund is granted only once the channel's fees cover it
at the current gas price (node/payment/x402/gas_cover.py)

Revision ID: 0016
Revises: 0015
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("x402_channels") as batch:
        batch.add_column(sa.Column("node_gas", sa.BigInteger(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("x402_channels") as batch:
        batch.drop_column("node_gas")
