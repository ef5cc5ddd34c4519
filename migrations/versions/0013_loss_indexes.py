"""loss indexes: a lane's write-offs and an epoch's losses read by key, not by scanning the node's losses

`losses(node, payer)` becomes `(node, payer, lane)`: the payer's uncollected total (node/db/queries.py:
`uncollected`, asked by the free GET /v1/channels) subtracts each lane's write-offs, one lane at a time.
`(node, epoch_id)` and `(node, recovered_epoch_id)`: an epoch's report (node/settlement/epoch_report.py:
`losses_of`, the free GET /v1/epochs/{node}/{id}) reads the losses recorded in it and those it recovered.

Revision ID: 0013
Revises: 0012
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("losses", schema=None) as batch_op:
        batch_op.drop_index("ix_losses_node_payer")
        batch_op.create_index("ix_losses_node_payer_lane", ["node", "payer", "lane"], unique=False)
        batch_op.create_index("ix_losses_node_epoch_id", ["node", "epoch_id"], unique=False)
        batch_op.create_index("ix_losses_node_recovered_epoch_id", ["node", "recovered_epoch_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("losses", schema=None) as batch_op:
        batch_op.drop_index("ix_losses_node_recovered_epoch_id")
        batch_op.drop_index("ix_losses_node_epoch_id")
        batch_op.drop_index("ix_losses_node_payer_lane")
        batch_op.create_index("ix_losses_node_payer", ["node", "payer"], unique=False)
