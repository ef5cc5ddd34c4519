"""What one address earned from a node, per epoch and per source, and how much of it is claimed
(`GET /v1/earnings/{node}/{account}?limit=&before=`, `loranode earnings ADDRESS`).

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

The answer is paged: one call looks at the `limit` newest published epochs before `before` (and the one
before them, for the first one's earning), never the whole history. The node and the treasury earn in every
epoch, so an answer that listed every epoch cost every call more as the node grew older. The totals come
from one tree each: `earned` is the account's cumulative amount in the newest published tree, `claimableNow`
its amount in the newest tree the chain pays now, less what it claimed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from eth_utils import to_checksum_address
from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session, sessionmaker

from node.db.models import Claim, SettledEpoch, SettlementEpoch
from node.settlement.epoch_builder import cumulative_of
from node.settlement.epoch_sources import EpochSources, Sources, epoch_sources
from node.settlement.overrule import VETOED, overruled, stale_epochs
from node.settlement.publication import PUBLISHED
from node.settlement.published_trees import WITHOUT_TREES, PublishedTrees
from node.settlement.split import SplitParams

MAX_PAGE = 50  # published epochs one call looks at (`limit`'s default and most), each explained by its sources


@dataclass(frozen=True)
class Page:
    """What one call reads of the node's published epochs, without their trees: the page's rows oldest
    first, the row before them (None at the start of the history), the newest row and the newest the
    chain pays now (the totals), the page's mirror rows and the claims."""

    rows: list[SettlementEpoch]
    before_page: SettlementEpoch | None
    newest: SettlementEpoch | None
    claimable: SettlementEpoch | None
    settled: dict[int, SettledEpoch]
    overruled: dict[int, str]
    forgotten: list[int]
    claimed: int

    def trees_read(self) -> list[SettlementEpoch]:
        """The rows whose rewards the answer reads: never more than the page's and three others."""
        return [r for r in (*self.rows, self.before_page, self.newest, self.claimable) if r is not None]


def rewards_in_row(row: SettlementEpoch) -> dict[str, int]:
    """The cumulative amounts of the row's rewards tree, read now (the API keeps them parsed: PublishedTrees)."""
    return cumulative_of((row.trees or {}).get("rewards"))


def earnings(session: Session, params: SplitParams, account: str, now: datetime | None = None,
             rewards_of: Callable[[SettlementEpoch], dict[str, int]] = rewards_in_row,
             sources_of: Callable[[SettlementEpoch], Sources] | None = None, limit: int = MAX_PAGE,
             before: int | None = None) -> dict[str, Any]:
    """`account`'s earnings from node `params.node`: totals, then one entry per epoch it earned in among the
    `limit` newest published epochs before `before`, oldest first, and `next` (the `before` of the next page,
    None on the last). `rewards_of` gives an epoch's cumulative amounts per checksummed account, `sources_of`
    every payee's amounts per source in an epoch (`epoch_sources`, replayed now, by default)."""
    now = now or datetime.now(UTC)
    page = read_page(session, params.node, account, now, limit, before)
    report = _report(page, params.node, account, now, rewards_of)
    return _explain(report, page, sources_of or (lambda row: epoch_sources(session, params, row.epoch_id)))


def earnings_from(factory: sessionmaker[Session], trees: PublishedTrees, sources: EpochSources, params: SplitParams,
                  account: str, limit: int = MAX_PAGE, before: int | None = None) -> dict[str, Any]:
    """`earnings`, each epoch's rewards taken from `trees` (their cumulative amounts, kept apart from the parsed
    trees) and its sources from `sources`: both read after the connection taken for the rows, so that no
    connection waits on another reader's tree or replay."""
    now = datetime.now(UTC)
    with factory() as session:
        page = read_page(session, params.node, account, now, limit, before)
    cumulative = {row.id: trees.cumulative(factory, row) for row in page.trees_read()}
    report = _report(page, params.node, account, now, lambda row: cumulative[row.id])
    return _explain(report, page, lambda row: sources.get(factory, params, row))


def read_page(session: Session, node: str, account: str, now: datetime, limit: int, before: int | None) -> Page:
    """The rows of one page of `account`'s earnings from `node` (see `Page`): a handful of indexed queries,
    none of which returns more than the page's rows, whatever the history's length."""
    node = node.lower()
    forgotten = sorted(stale_epochs(session, node))
    published = (select(SettlementEpoch).options(*WITHOUT_TREES)
                 .where(SettlementEpoch.node == node, SettlementEpoch.state.in_(PUBLISHED),
                        SettlementEpoch.epoch_id.not_in(forgotten))
                 .order_by(SettlementEpoch.epoch_id.desc()))
    newest = session.scalars(published.limit(1)).first()
    in_page = published if before is None else published.where(SettlementEpoch.epoch_id < before)
    rows = list(session.scalars(in_page.limit(limit + 1)))[::-1]
    before_page = rows.pop(0) if len(rows) > limit else None
    settled: dict[int, SettledEpoch] = {}
    latest_change = latest_veto = -1
    if rows:
        first, last = rows[0].epoch_id, rows[-1].epoch_id
        settled = {r.epoch_id: r for r in session.scalars(select(SettledEpoch).where(
            SettledEpoch.node == node, SettledEpoch.epoch_id.between(first, last)))}
        earlier = select(func.max(SettledEpoch.updated_block)).where(SettledEpoch.node == node,
                                                                      SettledEpoch.epoch_id < first)
        latest_change = session.scalar(earlier) or -1
        latest_veto = session.scalar(earlier.where(SettledEpoch.vetoed_block.is_not(None))) or -1
    claimed = int(session.scalar(select(func.max(Claim.cumulative_amount))
                                 .where(Claim.node == node, Claim.account == account.lower())) or 0)
    return Page(rows, before_page, newest, _newest_paid(session, node, now), settled,
                overruled(settled, latest_change, latest_veto), forgotten, claimed)


def _newest_paid(session: Session, node: str, now: datetime) -> SettlementEpoch | None:
    """The newest published epoch the chain pays now: settled with our tree, unlocked, not vetoed and not
    behind a veto or amend of an earlier epoch (`overruled`: no earlier epoch's mirror row changed after
    it was created)."""
    earlier_change = func.max(SettledEpoch.updated_block).over(order_by=SettledEpoch.epoch_id, rows=(None, -1))
    mirror = select(SettledEpoch.epoch_id, SettledEpoch.rewards_root, SettledEpoch.block_number,
                    SettledEpoch.vetoed_block, SettledEpoch.unlock_at,
                    earlier_change.label("earlier_change")).where(SettledEpoch.node == node).subquery()
    q = (select(SettlementEpoch).options(*WITHOUT_TREES)
         .join(mirror, mirror.c.epoch_id == SettlementEpoch.epoch_id)
         .where(SettlementEpoch.node == node, SettlementEpoch.state.in_(PUBLISHED),
                SettlementEpoch.rewards_root == mirror.c.rewards_root, mirror.c.vetoed_block.is_(None),
                mirror.c.unlock_at <= now,
                or_(mirror.c.earlier_change.is_(None), mirror.c.earlier_change <= mirror.c.block_number))
         .order_by(SettlementEpoch.epoch_id.desc()).limit(1))
    return session.scalars(q).first()


def _report(page: Page, node: str, account: str, now: datetime,
            rewards_of: Callable[[SettlementEpoch], dict[str, int]]) -> dict[str, Any]:
    """`earnings` without the sources."""
    who = to_checksum_address(account)

    def amount_in(row: SettlementEpoch | None) -> int:
        return 0 if row is None else rewards_of(row).get(who, 0)

    earned, claimable = amount_in(page.newest), amount_in(page.claimable)
    epochs: list[dict[str, Any]] = []
    previous = amount_in(page.before_page)
    for row in page.rows:
        cumulative = amount_in(row)
        if cumulative > previous:
            epochs.append(_epoch_entry(row, page.settled.get(row.epoch_id), previous, cumulative, page.claimed, now,
                                       page.overruled.get(row.epoch_id)))
        previous = cumulative
    more = page.before_page is not None and amount_in(page.before_page) > 0  # nothing earned before a 0
    claimed = page.claimed
    return {"node": to_checksum_address(node), "account": who, "earned": str(earned), "claimed": str(claimed),
            "unclaimed": str(max(earned - claimed, 0)), "claimableNow": str(max(claimable - claimed, 0)),
            "bySource": [], "epochs": epochs, "forgottenEpochs": page.forgotten,
            "next": page.rows[0].epoch_id if more else None}


def _explain(report: dict[str, Any], page: Page, sources_of: Callable[[SettlementEpoch], Sources]) -> dict[str, Any]:
    """`report` with the sources of each of its epochs and their sum per source."""
    rows = {row.epoch_id: row for row in page.rows}
    for entry in report["epochs"]:
        by_source = Counter(sources_of(rows[entry["epochId"]]).get(report["account"].lower(), {}))
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
