"""Where each payee's earning of a published epoch came from (a dataset's payout, an adapter's owner share,
the node's or the treasury's share), split once per epoch for every payee, whoever asks.

`GET /v1/earnings` explains an account's newest epochs by replaying the split (`split_shares`) over their
receipts. The node's operator and the treasury earn in every epoch, so that was every receipt of 50 epochs
on every call. An epoch's receipts never change under a given outbox row and roots (an amend the operator
adopts folds receipts in and writes new roots: node/settlement/amendment.py), so, as for the published
trees (node/settlement/published_trees.py), the key (split, row id, rewards root, receipts root) names
one answer forever. Concurrent askers of one epoch wait for one replay (single flight: node/flight_cache.py),
at most MAX_LOADING epochs are replayed at once, each on a connection of its own, and the answers are kept
least recently used first within `max_entries` (payee, source) amounts. Receipts of one adapter, lineage and fee
split alike, so each such group is split once and multiplied: exact, floors and all.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from node.attribution.evidence import stated_weights
from node.attribution.rule import METHOD_EVIDENCE
from node.db import queries
from node.db.models import Receipt, SettlementEpoch
from node.errors import MirrorUnavailable
from node.flight_cache import FlightCache
from node.protocol.receipt import BASE_ADAPTER_ID
from node.settlement.split import BASE_LINEAGE, Lineage, SplitParams, split_shares

MAX_LOADING = 2
Sources = dict[str, dict[str, int]]  # lower-case payee -> source label -> amount
SourcesKey = tuple[SplitParams, int, str | None, str | None]
Group = tuple[int, int, tuple[int, ...] | None, int]  # adapter id, registry block, method 2 weights, fee


def receipt_groups(session: Session, node: str, epoch_id: int) -> Counter[Group]:
    """The epoch's receipts counted by what their split depends on."""
    q = select(Receipt.adapter_id, Receipt.registry_block, Receipt.method, Receipt.attribution, Receipt.fee).where(
        Receipt.node == node.lower(), Receipt.epoch_id == epoch_id)
    groups: Counter[Group] = Counter()
    for adapter_id, block, method, attribution, fee in session.execute(q):
        weights = stated_weights(attribution).weights_bps if method == METHOD_EVIDENCE else None
        groups[(adapter_id, block, weights, int(fee))] += 1
    return groups


def built_payouts(session: Session, node: str, epoch_id: int) -> dict[int, str]:
    """The dataset payouts epoch `epoch_id` was built with (dataset id -> address; empty for an epoch built
    before they were kept): a dataset's owner may have moved its payout since."""
    batch = session.scalar(select(SettlementEpoch.batch).where(SettlementEpoch.node == node.lower(),
                                                               SettlementEpoch.epoch_id == epoch_id))
    return {int(k): v for k, v in (batch or {}).get("payouts", {}).items()}


def epoch_sources(session: Session, params: SplitParams, epoch_id: int) -> Sources:
    """Every payee's amounts per source in epoch `epoch_id` of node `params.node`, each dataset's share paid
    to the payout the epoch was built with."""
    out: dict[str, Counter[str]] = {}
    views: dict[tuple[int, int], tuple[Lineage, queries.AdapterLineageView | None]] = {}
    payouts = built_payouts(session, params.node, epoch_id)
    for (adapter_id, block, weights, fee), count in receipt_groups(session, params.node, epoch_id).items():
        if (adapter_id, block) not in views:
            views[(adapter_id, block)] = _lineage(session, adapter_id, block, payouts)
        lineage, view = views[(adapter_id, block)]
        if weights is not None:
            lineage = lineage.with_weights(weights)
        for share in split_shares(fee, params, lineage):
            if share.amount:
                label = _label(share.role, share.position, view)
                out.setdefault(share.payee.lower(), Counter())[label] += share.amount * count
    return {payee: dict(by_label) for payee, by_label in out.items()}


def _lineage(session: Session, adapter_id: int, block: int,
             payouts: dict[int, str]) -> tuple[Lineage, queries.AdapterLineageView | None]:
    if adapter_id == BASE_ADAPTER_ID:
        return BASE_LINEAGE, None
    view = queries.adapter_lineage(session, adapter_id, at_block=block)
    if view is None:
        raise MirrorUnavailable("the mirror lacks an adapter a receipt names", adapter_id=adapter_id,
                                registry_block=block)
    return Lineage(view.owner, view.owner_share_bps,
                   tuple((payouts.get(d.dataset_id, d.payout), d.weight_bps) for d in view.datasets)), view


def _label(role: str, position: int | None, view: queries.AdapterLineageView | None) -> str:
    if role == "dataset":
        assert position is not None and view is not None
        return f"dataset {view.datasets[position].dataset_id}"
    if role == "owner":
        assert view is not None
        return f"adapter {view.adapter_id} owner"
    return role


@dataclass
class EpochSources:
    """`epoch_sources` of published epochs, least recently used first, within `max_entries` amounts."""

    max_entries: int = 500_000
    _cache: FlightCache[SourcesKey, Sources] = field(init=False)

    def __post_init__(self) -> None:
        self._cache = FlightCache(self.max_entries, _num_amounts, MAX_LOADING)

    def get(self, factory: sessionmaker[Session], params: SplitParams, row: SettlementEpoch) -> Sources:
        """The sources of outbox row `row` (read without its trees) of node `params.node`."""
        key = (params, row.id, row.rewards_root, row.receipts_root)
        return self._cache.get(key, lambda key: _read(factory, key, row.epoch_id))


def _read(factory: sessionmaker[Session], key: SourcesKey, epoch_id: int) -> tuple[Sources, bool]:
    """(the epoch's sources, whether its row still had the key's roots after they were read: an adopted
    amend commits the receipts it folds in with the new roots)."""
    params, row_id, rewards_root, receipts_root = key
    with factory() as session:
        sources = epoch_sources(session, params, epoch_id)
        unchanged = session.scalar(select(SettlementEpoch.id).where(
            SettlementEpoch.id == row_id, SettlementEpoch.rewards_root == rewards_root,
            SettlementEpoch.receipts_root == receipts_root)) is not None
    return sources, unchanged


def _num_amounts(sources: Sources) -> int:
    return sum(len(by_label) for by_label in sources.values())
