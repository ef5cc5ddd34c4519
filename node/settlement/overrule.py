"""Which of a node's settled epochs the chain no longer pays against as the node settled them, read from
the chain mirror: one behind a guardian's veto (VETOED, until the guardian amends), one an amend forgot
(FORGOTTEN: `amend` drops every epoch after the vetoed one) and one whose tree an amend replaced (the
amended epoch, until the operator adopts the corrected tree).

The node's outbox keeps those rows as they were until the operator adopts the guardian's tree: adopt
reads them to fold the forgotten epochs' receipts into the amended one (the chain holds roots only, so
nothing but that file can correct them). Meanwhile nothing is published from them (`stale_epochs`).
"""

from __future__ import annotations

from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session

from node.db.models import SettledEpoch, SettlementEpoch

VETOED, FORGOTTEN = "vetoed", "forgotten"


def overruled(settled: dict[int, SettledEpoch], latest_change: int = -1, latest_veto: int = -1) -> dict[int, str]:
    """Settled epochs the chain no longer pays against as they were settled: an earlier epoch was vetoed
    (VETOED) or amended (FORGOTTEN) after them, i.e. that earlier epoch's mirror row changed in a block
    after theirs was created. An epoch id the node settles again after an amend has a new row, created
    after the amend: it stands. `settled` may be a run of epochs: `latest_change` and `latest_veto` are then
    the latest block in which a mirror row of an epoch before them changed, and was vetoed (-1: none)."""
    out: dict[int, str] = {}
    for epoch_id in sorted(settled):
        row = settled[epoch_id]
        if latest_veto > row.block_number:
            out[epoch_id] = VETOED
        elif latest_change > row.block_number:
            out[epoch_id] = FORGOTTEN
        latest_change = max(latest_change, row.updated_block)
        if row.vetoed_block is not None:
            latest_veto = max(latest_veto, row.updated_block)
    return out


def stale_epochs(session: Session, node: str) -> set[int]:
    """The node's epochs whose tree the chain does not hold: forgotten by an amend, or replaced by one
    (the mirror's roots differ from ours). One cheap query when no epoch of the node was ever changed, and
    only the rows settled before the latest veto or amend otherwise."""
    node = node.lower()
    last_change = session.scalar(select(func.max(SettledEpoch.updated_block)).where(
        SettledEpoch.node == node, SettledEpoch.updated_block > SettledEpoch.block_number))
    if last_change is None:
        return set()
    # a row created at or after the last change is never overruled, nor does it overrule an earlier one
    settled = {r.epoch_id: r for r in session.scalars(select(SettledEpoch).where(
        SettledEpoch.node == node, SettledEpoch.block_number < last_change))}
    stale = {epoch_id for epoch_id, why in overruled(settled).items() if why == FORGOTTEN}
    replaced = select(SettlementEpoch.epoch_id).join(SettledEpoch, and_(
        SettledEpoch.node == SettlementEpoch.node, SettledEpoch.epoch_id == SettlementEpoch.epoch_id)).where(
        SettlementEpoch.node == node, SettledEpoch.rewards_root != SettlementEpoch.rewards_root)
    return stale | set(session.scalars(replaced))
