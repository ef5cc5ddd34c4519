"""The reads the other parts share, written once. Every function takes a Session and returns plain
values (frozen dataclasses, ints for money); none calls the chain.

The escrow and lane figures read the mirror at the indexer's confirmation depth (`is_final` says
whether a row is past the finality depth too); settlement pays only from `is_final` rows. What a payer
may spend counts only deposits that are final, and a thaw cancelled only as of the last final block
(`Escrow.spendable`); debits and thaws started count at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from node.db.loss import is_written_off, written_off
from node.db.models import Adapter, AdapterLineage, Dataset, IndexerCursor, Lane, Loss, Receipt
from node.db.payment_models import EscrowAccount, LaneCollection


@dataclass(frozen=True)
class LaneState:
    payer: str
    node: str
    lane: int
    charged_total: int
    last_cumulative: int
    last_voucher_hash: str | None
    collected: int
    written_off: int = 0  # settlement losses on this lane that can never be collected (node/db/loss.py)

    @property
    def uncollected(self) -> int:
        """Charged by the node on this lane, not yet collected on chain, and still collectible."""
        return max(self.charged_total - self.collected - self.written_off, 0)


@dataclass(frozen=True)
class Escrow:
    payer: str
    node: str
    balance: int
    thawing: int
    thaw_end_at: datetime | None
    uncollected: int
    updated_block: int | None
    is_final: bool
    pending_deposits: int = 0  # in `balance`, not final yet
    pending_until_block: int | None = None  # the chain head at which they all are
    final_thawing: int = 0  # thawing as of the last final block, less withdrawn since

    @property
    def spendable(self) -> int:
        """What the payer may spend: final deposits, less withdrawals, collections and thawing seen at
        the confirmation depth (or as of the last final block, when more: a reorg can drop a cancel),
        less what the node charged and the chain has not collected."""
        thawing = max(self.thawing, self.final_thawing)
        return max(self.balance - self.pending_deposits - thawing - self.uncollected, 0)


@dataclass(frozen=True)
class LineageEntry:
    dataset_id: int
    weight_bps: int
    payout: str
    content_hash: str
    uri: str


@dataclass(frozen=True)
class AdapterLineageView:
    adapter_id: int
    owner: str
    base_model: str
    weights_sha256: str
    uri: str
    owner_share_bps: int
    lineage_hash: str
    registered_block: int
    is_deprecated: bool
    is_final: bool
    datasets: tuple[LineageEntry, ...]


@dataclass(frozen=True)
class MirrorHead:
    chain_id: int
    last_block: int
    final_block: int
    updated_at: datetime  # when the indexer last moved the mirror forward (UTC)
    genesis_hash: str | None = None  # the chain the mirror is bound to
    head_block: int | None = None  # the chain head the indexer last saw
    checked_at: datetime | None = None  # when the indexer last reached the chain (UTC)
    stalled_reason: str | None = None
    halted_reason: str | None = None

    def problem(self, now: datetime, max_lag_s: float, max_lag_blocks: int) -> str | None:
        """Why paid work must not rely on this mirror now, or None: the indexer halted it (another
        chain, a deep reorg), its last step failed, it has not reached the chain for `max_lag_s`, or
        it is more than `max_lag_blocks` behind the head it saw."""
        if self.halted_reason:
            return self.halted_reason
        if self.stalled_reason:
            return f"the indexer cannot follow the chain: {self.stalled_reason}"
        seen_at = self.checked_at or self.updated_at
        lag_s = (now - seen_at).total_seconds()
        if lag_s > max_lag_s:
            return f"the indexer has not reached the chain for {lag_s:.0f} s (limit {max_lag_s:g} s)"
        behind = 0 if self.head_block is None else self.head_block - self.last_block
        if behind > max_lag_blocks:
            return f"the mirror is {behind} blocks behind the chain head (limit {max_lag_blocks})"
        return None


def payer_lanes(session: Session, payer: str, node: str | None = None) -> list[LaneState]:
    """The payer's lanes (with one node, or all), with what the chain has collected on each."""
    payer = payer.lower()
    q = select(Lane).where(Lane.payer == payer).order_by(Lane.node, Lane.lane)
    c = select(LaneCollection).where(LaneCollection.payer == payer)
    if node is not None:
        q, c = q.where(Lane.node == node.lower()), c.where(LaneCollection.node == node.lower())
    collected = {(r.node, r.lane): r.collected for r in session.scalars(c)}
    rows = list(session.scalars(q))
    lost = {n: written_off(session, payer, n) for n in {r.node for r in rows}}
    return [LaneState(payer=r.payer, node=r.node, lane=r.lane, charged_total=r.charged_total,
                      last_cumulative=r.last_cumulative, last_voucher_hash=r.last_voucher_hash,
                      collected=collected.get((r.node, r.lane), 0), written_off=lost[r.node].get(r.lane, 0))
            for r in rows]


def uncollected(session: Session, payer: str, node: str) -> int:
    """`LaneState.uncollected` summed over the payer's lanes with `node`. On PostgreSQL one sum in the database
    (an index range per table, no row leaves it), so that what it costs a caller does not grow with the lanes
    a payer opens at will (a free read asks it: GET /v1/channels); SQLite keeps amounts as strings
    (node/db/types.py), so there they are summed here."""
    payer, node = payer.lower(), node.lower()
    if session.get_bind().dialect.name == "sqlite":
        return sum(lane.uncollected for lane in payer_lanes(session, payer, node))
    # per lane, its collection and its write-offs looked up by key: a plan that cannot turn into a scan of
    # one table per row of the other, whatever the planner's statistics say of freshly written lanes. The
    # write-off's conditions are in the sum, not the WHERE: with no statistics the planner took the
    # (node, recovered_epoch_id) index for them and read the node's losses once per lane.
    collected = (select(LaneCollection.collected).where(LaneCollection.payer == Lane.payer,
                                                        LaneCollection.node == Lane.node,
                                                        LaneCollection.lane == Lane.lane).scalar_subquery())
    lost = (select(func.sum(case((is_written_off(), Loss.amount))))
            .where(Loss.node == Lane.node, Loss.payer == Lane.payer, Loss.lane == Lane.lane).scalar_subquery())
    owed = Lane.charged_total - func.coalesce(collected, 0) - func.coalesce(lost, 0)
    q = select(func.coalesce(func.sum(func.greatest(owed, 0)), 0)).where(Lane.payer == payer, Lane.node == node)
    return int(session.scalar(q) or 0)


def escrow(session: Session, payer: str, node: str, uncollected_total: int | None = None) -> Escrow:
    """The (payer, node) escrow account as mirrored, with the node's uncollected charges (`uncollected`,
    read now unless given)."""
    payer, node = payer.lower(), node.lower()
    acct = session.get(EscrowAccount, (payer, node))
    if uncollected_total is None:
        uncollected_total = uncollected(session, payer, node)
    if acct is None:
        return Escrow(payer, node, 0, 0, None, uncollected_total, None, False)
    return Escrow(payer, node, acct.balance, acct.thawing, acct.thaw_end_at, uncollected_total,
                  acct.updated_block, acct.is_final, acct.pending_deposits, acct.pending_until_block,
                  acct.final_thawing)


def spendable_escrow(session: Session, payer: str, node: str) -> int:
    """balance - deposits not final yet - thawing (as of the last final block when more) - (charged on
    all lanes but not yet collected), never below zero."""
    return escrow(session, payer, node).spendable


def adapter_lineage(session: Session, adapter_id: int,
                    at_block: int | None = None) -> AdapterLineageView | None:
    """The adapter as registered at `at_block` (default: the mirror's head), None if it was not
    registered by then. Lineage is immutable; deprecation counts from its own block."""
    adapter = session.get(Adapter, adapter_id)
    if adapter is None or (at_block is not None and adapter.block_number > at_block):
        return None
    rows = session.execute(
        select(AdapterLineage.dataset_id, AdapterLineage.weight_bps, Dataset.payout, Dataset.content_hash,
               Dataset.uri)
        .join(Dataset, Dataset.dataset_id == AdapterLineage.dataset_id)
        .where(AdapterLineage.adapter_id == adapter_id).order_by(AdapterLineage.position)).all()
    dep = adapter.deprecated_block
    deprecated = dep is not None and (at_block is None or dep <= at_block)
    return AdapterLineageView(
        adapter_id=adapter.adapter_id, owner=adapter.owner, base_model=adapter.base_model,
        weights_sha256=adapter.weights_sha256, uri=adapter.uri, owner_share_bps=adapter.owner_share_bps,
        lineage_hash=adapter.lineage_hash, registered_block=adapter.block_number, is_deprecated=deprecated,
        is_final=adapter.is_final, datasets=tuple(LineageEntry(*row) for row in rows))


def adapter_lineages(session: Session, base_model: str) -> list[AdapterLineageView]:
    """Every adapter registered for `base_model` as the mirror's head has it, by id, in two queries
    (whatever their number): `adapter_lineage` of each."""
    adapters = session.scalars(select(Adapter).where(Adapter.base_model == base_model)
                               .order_by(Adapter.adapter_id)).all()
    rows = session.execute(
        select(AdapterLineage.adapter_id, AdapterLineage.dataset_id, AdapterLineage.weight_bps, Dataset.payout,
               Dataset.content_hash, Dataset.uri)
        .join(Dataset, Dataset.dataset_id == AdapterLineage.dataset_id)
        .join(Adapter, Adapter.adapter_id == AdapterLineage.adapter_id)
        .where(Adapter.base_model == base_model)
        .order_by(AdapterLineage.adapter_id, AdapterLineage.position)).all()
    datasets: dict[int, list[LineageEntry]] = {}
    for adapter_id, dataset_id, weight_bps, payout, content_hash, uri in rows:
        datasets.setdefault(adapter_id, []).append(LineageEntry(dataset_id, weight_bps, payout, content_hash, uri))
    return [AdapterLineageView(
        adapter_id=a.adapter_id, owner=a.owner, base_model=a.base_model, weights_sha256=a.weights_sha256, uri=a.uri,
        owner_share_bps=a.owner_share_bps, lineage_hash=a.lineage_hash, registered_block=a.block_number,
        is_deprecated=a.deprecated_block is not None, is_final=a.is_final,
        datasets=tuple(datasets.get(a.adapter_id, ()))) for a in adapters]


def epoch_receipts(session: Session, node: str, epoch_id: int) -> list[Receipt]:
    """The receipts assigned to `node`'s epoch, in the order they were written."""
    q = select(Receipt).where(Receipt.node == node.lower(), Receipt.epoch_id == epoch_id).order_by(Receipt.id)
    return list(session.scalars(q))


def mirror_head(session: Session) -> MirrorHead | None:
    """How far the mirror has indexed (None before the indexer's first range)."""
    cur = session.scalars(select(IndexerCursor)).first()
    if cur is None:
        return None
    return MirrorHead(cur.chain_id, cur.last_block, cur.final_block, cur.updated_at, cur.genesis_hash,
                      cur.head_block, cur.checked_at, cur.stalled_reason, cur.halted_reason)
