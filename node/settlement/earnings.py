"""What one address earned from a node, per epoch and per source, and how much of it is claimed
(`GET /v1/earnings/{node}/{account}`, `loranode earnings ADDRESS`).

The published rewards trees are the truth: an epoch's earning is the account's cumulative amount in
that epoch's tree less the one before. Its sources (a dataset's payout, an adapter's owner share, the
node's or the treasury's share) are recomputed from the epoch's receipts with the same split
(`split_shares`); were they ever to differ from the tree, the difference is shown as `unexplained`.
Claims are cumulative per account (the chain mirror's `Claimed` events): they pay the oldest epochs
first. An epoch the guardian's amend forgot (settled after the vetoed epoch) or replaced (the amended
one, until the operator adopts the corrected tree) is never shown as earned: the chain pays it only
through the corrected tree (`forgottenEpochs` names them meanwhile). Everything here is public once
the epoch is settled: the trees, the receipts' fees, adapters and weights, and the registries.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from eth_utils import to_checksum_address
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from node.db import queries
from node.db.models import Claim, SettledEpoch, SettlementEpoch
from node.settlement import outbox
from node.settlement.epoch_builder import EpochReceipt, cumulative_of
from node.settlement.overrule import FORGOTTEN, VETOED, overruled
from node.settlement.publication import PUBLISHED
from node.settlement.published_trees import WITHOUT_TREES, PublishedTrees
from node.settlement.split import Lineage, SplitParams, split_shares

MAX_DETAILED_EPOCHS = 50  # epochs whose receipts are replayed for the sources, newest first


def published_rows(session: Session, node: str) -> list[SettlementEpoch]:
    """The node's published outbox rows, oldest first, without their trees."""
    return list(session.scalars(select(SettlementEpoch).options(*WITHOUT_TREES)
                                .where(SettlementEpoch.node == node.lower(), SettlementEpoch.state.in_(PUBLISHED))
                                .order_by(SettlementEpoch.epoch_id)))


def rewards_in_row(row: SettlementEpoch) -> dict[str, int]:
    """The cumulative amounts of the row's rewards tree, read now (the API keeps them parsed: PublishedTrees)."""
    return cumulative_of((row.trees or {}).get("rewards"))


def earnings(session: Session, params: SplitParams, account: str, now: datetime | None = None,
             rewards_of: Callable[[SettlementEpoch], dict[str, int]] = rewards_in_row) -> dict[str, Any]:
    """`account`'s earnings from node `params.node`: totals, then one entry per epoch it earned in.
    `rewards_of` gives an epoch's cumulative amounts per checksummed account."""
    node, who = params.node.lower(), to_checksum_address(account)
    now = now or datetime.now(UTC)
    rows = published_rows(session, node)
    claimed = int(session.scalar(select(func.max(Claim.cumulative_amount))
                                 .where(Claim.node == node, Claim.account == who.lower())) or 0)
    settled = {r.epoch_id: r for r in session.scalars(select(SettledEpoch).where(SettledEpoch.node == node))}
    overruled_by = overruled(settled)
    epochs: list[dict[str, Any]] = []
    forgotten: list[int] = []
    previous = claimable = 0
    for row in rows:
        on_chain, why = settled.get(row.epoch_id), overruled_by.get(row.epoch_id)
        if on_chain is not None and on_chain.rewards_root != row.rewards_root:
            why = FORGOTTEN  # the guardian's amend replaced this tree: the chain pays the corrected one
        if why == FORGOTTEN:  # never claimable as we built it; the amended epoch's corrected leaves pay it
            forgotten.append(row.epoch_id)
            continue
        cumulative = rewards_of(row).get(who, 0)
        if on_chain is not None and on_chain.vetoed_block is None and why is None and on_chain.unlock_at <= now:
            claimable = cumulative
        if cumulative > previous:
            epochs.append(_epoch_entry(row, on_chain, previous, cumulative, claimed, now, why))
        previous = cumulative
    for entry in epochs[-MAX_DETAILED_EPOCHS:]:
        entry["sources"] = _sources(session, params, who, entry["epochId"], int(entry["earned"]))
    return {"node": to_checksum_address(node), "account": who, "earned": str(previous), "claimed": str(claimed),
            "unclaimed": str(max(previous - claimed, 0)), "claimableNow": str(max(claimable - claimed, 0)),
            "bySource": _by_source(epochs), "epochs": epochs, "forgottenEpochs": forgotten}


def earnings_from(factory: sessionmaker[Session], trees: PublishedTrees, params: SplitParams,
                  account: str) -> dict[str, Any]:
    """`earnings`, each epoch's rewards taken from `trees`: read before a connection is taken for the rest,
    so that no connection waits on another reader's tree."""
    with factory() as session:
        rows = published_rows(session, params.node)
    parsed = {row.id: trees.get(factory, row) for row in rows}

    def rewards_of(row: SettlementEpoch) -> dict[str, int]:
        found = parsed[row.id] if row.id in parsed else trees.get(factory, row)  # or one published since
        return {} if found is None else found.cumulative

    with factory() as session:
        return earnings(session, params, account, rewards_of=rewards_of)


def _epoch_entry(row: SettlementEpoch, on_chain: SettledEpoch | None, previous: int, cumulative: int,
                 claimed: int, now: datetime, overruled: str | None) -> dict[str, Any]:
    earned = cumulative - previous
    paid = min(max(claimed - previous, 0), earned)
    if paid == earned:
        status = "claimed"
    elif on_chain is None:
        status = "not in the chain mirror yet"
    elif on_chain.vetoed_block is not None or overruled == VETOED:
        status = "vetoed"
    elif on_chain.unlock_at > now:
        status = f"locked until {on_chain.unlock_at.isoformat()}"
    else:
        status = "partly claimed" if paid else "claimable"
    return {"epochId": row.epoch_id, "state": row.state.value, "earned": str(earned), "claimed": str(paid),
            "cumulative": str(cumulative), "status": status, "txHash": row.tx_hash, "sources": None}


def _sources(session: Session, params: SplitParams, who: str, epoch_id: int, earned: int) -> list[dict[str, Any]]:
    """Where `who`'s earning of this epoch came from, by replaying the split over its receipts."""
    receipts = outbox.epoch_receipts(session, params.node, epoch_id)
    by_source: Counter[str] = Counter()
    views: dict[tuple[int, int], queries.AdapterLineageView] = {}
    for r in receipts:
        key = (r.adapter_id, r.registry_block)
        if key not in views:
            views[key] = outbox.lineage_view(session, r)
        for label, amount in _shares_of(r, views[key], params, who):
            by_source[label] += amount
    unexplained = earned - sum(by_source.values())
    if unexplained:
        by_source["unexplained"] += unexplained
    return [{"source": label, "amount": str(amount)} for label, amount in sorted(by_source.items()) if amount]


def _shares_of(r: EpochReceipt, view: queries.AdapterLineageView, params: SplitParams,
               who: str) -> list[tuple[str, int]]:
    lineage = Lineage(view.owner, view.owner_share_bps, tuple((d.payout, d.weight_bps) for d in view.datasets))
    if r.weights_bps is not None:
        lineage = lineage.with_weights(r.weights_bps)
    out = []
    for share in split_shares(r.fee, params, lineage):
        if share.amount and share.payee.lower() == who.lower():
            out.append((_label(share.role, share.position, view), share.amount))
    return out


def _label(role: str, position: int | None, view: queries.AdapterLineageView) -> str:
    if role == "dataset":
        assert position is not None
        return f"dataset {view.datasets[position].dataset_id}"
    if role == "owner":
        return f"adapter {view.adapter_id} owner"
    return role


def _by_source(epochs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    total: Counter[str] = Counter()
    for entry in epochs:
        for s in entry["sources"] or []:
            total[s["source"]] += int(s["amount"])
    return [{"source": label, "amount": str(amount)} for label, amount in sorted(total.items())]
