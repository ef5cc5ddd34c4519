"""What one address earned from a node, per epoch and per source, and how much of it is claimed
(`GET /v1/earnings/{node}/{account}`, `loranode earnings ADDRESS`).

The published rewards trees are the truth: an epoch's earning is the account's cumulative amount in
that epoch's tree less the one before. Its sources (a dataset's payout, an adapter's owner share, the
node's or the treasury's share) are recomputed from the epoch's receipts with the same split
(`split_shares`; once per epoch for every payee in the API: node/settlement/epoch_sources.py); were
they ever to differ from the tree, the difference is shown as `unexplained`. Claims are cumulative per
account (the chain mirror's `Claimed` events): they pay the oldest epochs first. An epoch the
guardian's amend forgot (settled after the vetoed epoch) or replaced (the amended one, until the
operator adopts the corrected tree) is never shown as earned: the chain pays it only through the
corrected tree (`forgottenEpochs` names them meanwhile). Everything here is public once the epoch is
settled: the trees, the receipts' fees, adapters and weights, and the registries.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from eth_utils import to_checksum_address
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from node.db.models import Claim, SettledEpoch, SettlementEpoch
from node.settlement.epoch_builder import cumulative_of
from node.settlement.epoch_sources import EpochSources, Sources, epoch_sources
from node.settlement.overrule import FORGOTTEN, VETOED, overruled
from node.settlement.publication import PUBLISHED
from node.settlement.published_trees import WITHOUT_TREES, PublishedTrees
from node.settlement.split import SplitParams

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
             rewards_of: Callable[[SettlementEpoch], dict[str, int]] = rewards_in_row,
             sources_of: Callable[[SettlementEpoch], Sources] | None = None) -> dict[str, Any]:
    """`account`'s earnings from node `params.node`: totals, then one entry per epoch it earned in.
    `rewards_of` gives an epoch's cumulative amounts per checksummed account, `sources_of` every payee's
    amounts per source in an epoch (`epoch_sources`, replayed now, by default)."""
    report, explained = _earned(session, params, account, now, rewards_of)
    return _explain(report, explained, sources_of or (lambda row: epoch_sources(session, params, row.epoch_id)))


def earnings_from(factory: sessionmaker[Session], trees: PublishedTrees, sources: EpochSources, params: SplitParams,
                  account: str) -> dict[str, Any]:
    """`earnings`, each epoch's rewards taken from `trees` (their cumulative amounts, kept apart from the parsed
    trees) and its sources from `sources`: both read before or after the connection taken for the rest, so
    that no connection waits on another reader's tree or replay."""
    with factory() as session:
        rows = published_rows(session, params.node)
    cumulative = {row.id: trees.cumulative(factory, row) for row in rows}

    def rewards_of(row: SettlementEpoch) -> dict[str, int]:
        return cumulative[row.id] if row.id in cumulative else trees.cumulative(factory, row)  # or one published since

    with factory() as session:
        report, explained = _earned(session, params, account, None, rewards_of)
    return _explain(report, explained, lambda row: sources.get(factory, params, row))


def _earned(session: Session, params: SplitParams, account: str, now: datetime | None,
            rewards_of: Callable[[SettlementEpoch], dict[str, int]]) -> tuple[dict[str, Any], list[SettlementEpoch]]:
    """`earnings` without the sources, and the rows of the newest MAX_DETAILED_EPOCHS epochs earned in."""
    node, who = params.node.lower(), to_checksum_address(account)
    now = now or datetime.now(UTC)
    rows = published_rows(session, node)
    claimed = int(session.scalar(select(func.max(Claim.cumulative_amount))
                                 .where(Claim.node == node, Claim.account == who.lower())) or 0)
    settled = {r.epoch_id: r for r in session.scalars(select(SettledEpoch).where(SettledEpoch.node == node))}
    overruled_by = overruled(settled)
    epochs: list[dict[str, Any]] = []
    earned_in: list[SettlementEpoch] = []
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
            earned_in.append(row)
        previous = cumulative
    return {"node": to_checksum_address(node), "account": who, "earned": str(previous), "claimed": str(claimed),
            "unclaimed": str(max(previous - claimed, 0)), "claimableNow": str(max(claimable - claimed, 0)),
            "bySource": [], "epochs": epochs, "forgottenEpochs": forgotten}, earned_in[-MAX_DETAILED_EPOCHS:]


def _explain(report: dict[str, Any], rows: list[SettlementEpoch],
             sources_of: Callable[[SettlementEpoch], Sources]) -> dict[str, Any]:
    """`report` with the sources of its epochs of `rows` (the newest) and their sum per source."""
    entries = report["epochs"][len(report["epochs"]) - len(rows):]
    for entry, row in zip(entries, rows, strict=True):
        assert entry["epochId"] == row.epoch_id
        by_source = Counter(sources_of(row).get(report["account"].lower(), {}))
        unexplained = int(entry["earned"]) - sum(by_source.values())
        if unexplained:
            by_source["unexplained"] += unexplained
        entry["sources"] = [{"source": label, "amount": str(amount)}
                            for label, amount in sorted(by_source.items()) if amount]
    report["bySource"] = _by_source(report["epochs"])
    return report


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


def _by_source(epochs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    total: Counter[str] = Counter()
    for entry in epochs:
        for s in entry["sources"] or []:
            total[s["source"]] += int(s["amount"])
    return [{"source": label, "amount": str(amount)} for label, amount in sorted(total.items())]
