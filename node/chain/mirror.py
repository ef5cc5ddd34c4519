"""The chain mirror's writes: ingest decoded events, roll back above a fork, mark rows final.

Every write happens inside the caller's transaction, so a range of logs, its derived rows and the
indexer cursor commit together or not at all. Rows are rebuilt with `projection.apply`, the same
function forward and on rollback, which makes a rollback exact by construction.

An escrow row (and an x402 channel row) also carries its deposits that are not final yet (`pending_deposits`, and
`pending_until_block`: the chain head at which the latest of them is `finality_depth` deep). A payer
may spend only what is final (docs/indexer.md): a reorg above the finalized block can remove a deposit,
never a debit the mirror has not counted yet. They are summed from the raw events above the finalized
block whenever an escrow row is written, rolled back or finalized.

Both also carry what the payer had set aside to leave with as of the finalized block (an escrow's thaw,
a channel's pending withdrawal), less what it was paid out since, and when that ends (`final_thawing`,
`final_thaw_end_at`; `final_pending_withdrawal`, `final_withdraw_ready_at`): a reorg above the finalized
block can drop a cancel, a lowering or a restart and bring back an amount set aside that ends sooner, so
the holds count the larger of it and the mirror's (one set aside above the finalized block counts at
once), and settlement the sooner end. They are replayed from the raw events of the rows that set,
lowered or paid out such an amount above the finalized block (the mirror's own for the others), at the
same moments.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import CursorResult, Table, and_, delete, exists, select, tuple_, update
from sqlalchemy.orm import Session

from node.chain.events import ChainEvent, args_from_json, args_to_json
from node.chain.projection import CREATING, KINDS, Row, entity_of, kind_of, replay
from node.db.base import table_of
from node.db.models import (
    Adapter,
    AdapterLineage,
    ChainBlock,
    Claim,
    Dataset,
    EpochState,
    RawEvent,
    SettledEpoch,
    SettlementEpoch,
)
from node.db.payment_models import ChannelAccount, EscrowAccount, LaneCollection
from node.db.upsert import insert_new, upsert

log = logging.getLogger(__name__)

TABLES: dict[str, Table] = {
    "dataset": table_of(Dataset), "adapter": table_of(Adapter), "escrow": table_of(EscrowAccount),
    "lane": table_of(LaneCollection), "epoch": table_of(SettledEpoch), "claim": table_of(Claim),
    "channel": table_of(ChannelAccount),
}
DEPOSITS = {"escrow": "Deposited", "channel": "ChannelDeposited"}  # rows whose deposits count once final


@dataclass(frozen=True)
class SetAside:
    """What a payer sets aside to leave with, in one kind of row: the `amount` column and its `end`'s, the
    events that set or lower it (a reorg can undo them) and those that pay part of it out."""

    amount: str
    end: str
    events: tuple[str, ...]
    payouts: tuple[str, ...]


SET_ASIDE = {
    "escrow": SetAside("thawing", "thaw_end_at", ("ThawStarted", "Withdrawn"), ("Withdrawn",)),
    "channel": SetAside("pending_withdrawal", "withdraw_ready_at",
                        ("ChannelWithdrawInitiated", "ChannelWithdrawn", "ChannelRefunded"),
                        ("ChannelWithdrawn", "ChannelRefunded")),
}
INT_KEYS = frozenset({"dataset_id", "adapter_id", "lane", "epoch_id"})
CHUNK = 500
RAW = table_of(RawEvent)
LINEAGE = table_of(AdapterLineage)


def _keys(kind: str) -> list[str]:
    return [c.name for c in TABLES[kind].primary_key.columns]


def _pk(entity: str) -> tuple[Any, ...]:
    kind, *parts = entity.split(":")
    return tuple(int(p) if k in INT_KEYS else p for k, p in zip(_keys(kind), parts, strict=True))


def _entity(kind: str, row: Row) -> str:
    return ":".join([kind, *(str(row[k]) for k in _keys(kind))])


class Mirror:
    """The indexer's port to the mirror tables, for one chain."""

    def __init__(self, chain_id: int, finality_depth: int = 0) -> None:
        self.chain_id = chain_id
        self.finality_depth = finality_depth

    def ingest(self, session: Session, events: Sequence[ChainEvent], final_block: int) -> int:
        """Store `events` (in chain order) and apply those not stored before; returns how many."""
        events = list({(ev.tx_hash, ev.log_index): ev for ev in reversed(events)}.values())[::-1]
        rows = [self._raw_row(ev, final_block) for ev in events]
        key = ("chain_id", "tx_hash", "log_index")
        stored = set(insert_new(session, RAW, rows, key, ("tx_hash", "log_index")))
        fresh = [ev for ev in events if (ev.tx_hash, ev.log_index) in stored]
        by_entity: dict[str, list[ChainEvent]] = defaultdict(list)
        for ev in fresh:
            by_entity[entity_of(ev)].append(ev)
        need = [e for e, evs in by_entity.items() if evs[0].name not in CREATING]
        current = self._load(session, need)
        states = {e: replay(current.get(e), evs) for e, evs in by_entity.items()}
        self._set_pending(session, states, final_block)
        self._set_final_set_aside(session, states, final_block)
        self._save(session, states, final_block)
        self._sync_outbox(session)
        return len(fresh)

    def rollback(self, session: Session, to_block: int, final_block: int) -> int:
        """Delete every event above `to_block` and rebuild the rows they touched; returns how many."""
        above = RAW.c.block_number > to_block
        where = and_(RAW.c.chain_id == self.chain_id, above)
        entities = list(session.scalars(select(RAW.c.entity).where(where).distinct()))
        removed = cast(CursorResult[Any], session.execute(delete(RAW).where(where))).rowcount
        remaining: dict[str, list[ChainEvent]] = {e: [] for e in entities}
        for chunk in _chunks(entities):
            q = (select(RAW).where(RAW.c.chain_id == self.chain_id, RAW.c.entity.in_(chunk))
                 .order_by(RAW.c.block_number, RAW.c.log_index))
            for r in session.execute(q).mappings():
                remaining[r["entity"]].append(self._event(r))
        states = {e: replay(None, evs) for e, evs in remaining.items()}
        self._set_pending(session, states, final_block)
        self._set_final_set_aside(session, states, final_block)
        self._save(session, states, final_block)
        session.execute(delete(ChainBlock).where(ChainBlock.chain_id == self.chain_id,
                                                 ChainBlock.number > to_block))
        self._sync_outbox(session)
        log.warning("rolled back %d events above block %d (%d rows rebuilt)",
                    removed, to_block, len(entities))
        return int(removed)

    def finalize(self, session: Session, final_block: int) -> None:
        """Mark rows at or below `final_block` final and forget block hashes below it."""
        self._finalize_pending(session, final_block)
        self._finalize_set_aside(session, final_block)
        session.execute(update(RAW).where(RAW.c.is_final.is_(False), RAW.c.chain_id == self.chain_id,
                                          RAW.c.block_number <= final_block).values(is_final=True))
        for table in TABLES.values():
            not_final = and_(table.c.is_final.is_(False), table.c.updated_block <= final_block)
            session.execute(update(table).where(not_final).values(is_final=True))
        session.execute(delete(ChainBlock).where(ChainBlock.chain_id == self.chain_id,
                                                 ChainBlock.number < final_block))
        self._sync_outbox(session)

    # --- deposits not final yet -------------------------------------------------------------------

    def _set_pending(self, session: Session, states: dict[str, Row | None], final_block: int) -> None:
        """Give each escrow or channel row in `states` its deposits above `final_block` (from the raw events)."""
        for kind in DEPOSITS:
            rows = [e for e, row in states.items() if row is not None and kind_of(e) == kind]
            pending = self._pending_deposits(session, kind, rows, final_block)
            for e in rows:
                amount, last_block = pending.get(e, (0, None))
                row = states[e]
                assert row is not None
                row["pending_deposits"] = amount
                row["pending_until_block"] = None if last_block is None else last_block + self.finality_depth

    def _finalize_pending(self, session: Session, final_block: int) -> None:
        """Rows final now have no pending deposits; rows that stay not final keep those above
        `final_block` only (their latest deposit's `pending_until_block` stands)."""
        for kind in DEPOSITS:
            table, keys = TABLES[kind], _keys(kind)
            pending, not_final = table.c.pending_until_block.is_not(None), table.c.is_final.is_(False)
            session.execute(update(table).where(pending, not_final, table.c.updated_block <= final_block)
                            .values(pending_deposits=0, pending_until_block=None))
            rows = session.execute(select(*[table.c[k] for k in keys]).where(
                pending, not_final, table.c.updated_block > final_block)).all()
            entities = [_entity(kind, dict(zip(keys, r, strict=True))) for r in rows]
            amounts = self._pending_deposits(session, kind, entities, final_block)
            for r, e in zip(rows, entities, strict=True):
                where = [table.c[k] == v for k, v in zip(keys, r, strict=True)]
                session.execute(update(table).where(*where).values(pending_deposits=amounts.get(e, (0, None))[0]))

    def _pending_deposits(self, session: Session, kind: str, entities: Sequence[str],
                          final_block: int) -> dict[str, tuple[int, int]]:
        """{entity: (sum of its deposits above `final_block`, the latest one's block)}."""
        event = DEPOSITS[kind]
        out: dict[str, tuple[int, int]] = {}
        for chunk in _chunks(entities):
            q = select(RAW.c.entity, RAW.c.block_number, RAW.c.args).where(
                RAW.c.chain_id == self.chain_id, RAW.c.event == event, RAW.c.block_number > final_block,
                RAW.c.entity.in_(chunk))
            for entity, block, args in session.execute(q):
                total, last = out.get(entity, (0, block))
                out[entity] = (total + args_from_json(event, args)["amount"], max(last, block))
        return out

    # --- what is set aside to leave with, as of the finalized block --------------------------------

    def _set_final_set_aside(self, session: Session, states: dict[str, Row | None], final_block: int) -> None:
        for kind, aside in SET_ASIDE.items():
            rows = [e for e, row in states.items() if row is not None and kind_of(e) == kind]
            final = self._final_set_aside(session, kind, rows, final_block)
            for e in rows:
                row = states[e]
                assert row is not None
                row["final_" + aside.amount], row["final_" + aside.end] = final.get(
                    e, (row[aside.amount], row[aside.end]))

    def _finalize_set_aside(self, session: Session, final_block: int) -> None:
        """Give the rows with such an event above the last finalized block (raw events not marked final
        yet) their amount set aside and its end as of `final_block`."""
        for kind, aside in SET_ASIDE.items():
            table, keys = TABLES[kind], _keys(kind)
            entities = list(session.scalars(select(RAW.c.entity).where(
                RAW.c.chain_id == self.chain_id, RAW.c.is_final.is_(False), RAW.c.event.in_(aside.events))
                .distinct()))
            final = self._final_set_aside(session, kind, entities, final_block)
            for e in entities:
                amount, end = final.get(e, (table.c[aside.amount], table.c[aside.end]))
                where = [table.c[k] == v for k, v in zip(keys, _pk(e), strict=True)]
                session.execute(update(table).where(*where).values(
                    {"final_" + aside.amount: amount, "final_" + aside.end: end}))

    def _final_set_aside(self, session: Session, kind: str, entities: Sequence[str],
                         final_block: int) -> dict[str, tuple[int, datetime | None]]:
        """{entity: (what it had set aside as of `final_block` less what was paid out above it, its end)}
        for those `entities` with an event that sets, lowers or pays it out above `final_block` (replayed
        from their raw events); the others are left out (the mirror's amount is all a reorg can bring back)."""
        aside = SET_ASIDE[kind]
        moved: list[str] = []
        for chunk in _chunks(entities):
            moved += session.scalars(select(RAW.c.entity).where(
                RAW.c.chain_id == self.chain_id, RAW.c.event.in_(aside.events), RAW.c.block_number > final_block,
                RAW.c.entity.in_(chunk)).distinct())
        events: dict[str, list[ChainEvent]] = defaultdict(list)
        for chunk in _chunks(moved):
            q = (select(RAW).where(RAW.c.chain_id == self.chain_id, RAW.c.entity.in_(chunk))
                 .order_by(RAW.c.block_number, RAW.c.log_index))
            for r in session.execute(q).mappings():
                events[r["entity"]].append(self._event(r))
        out: dict[str, tuple[int, datetime | None]] = {}
        for e, evs in events.items():
            final = replay(None, [ev for ev in evs if ev.block_number <= final_block]) or {aside.amount: 0}
            paid = sum(ev.args["amount"] for ev in evs if ev.name in aside.payouts and ev.block_number > final_block)
            amount = max(final[aside.amount] - paid, 0)
            out[e] = (amount, final.get(aside.end) if amount else None)
        return out

    # --- rows ----------------------------------------------------------------------------------

    def _raw_row(self, ev: ChainEvent, final_block: int) -> Row:
        return {"chain_id": self.chain_id, "block_number": ev.block_number, "block_hash": ev.block_hash,
                "tx_hash": ev.tx_hash, "log_index": ev.log_index, "address": ev.address, "event": ev.name,
                "entity": entity_of(ev), "args": args_to_json(ev.args),
                "is_final": ev.block_number <= final_block}

    def _event(self, r: Any) -> ChainEvent:
        return ChainEvent(chain_id=r["chain_id"], block_number=r["block_number"],
                          block_hash=r["block_hash"], tx_hash=r["tx_hash"], log_index=r["log_index"],
                          address=r["address"], name=r["event"], args=args_from_json(r["event"], r["args"]))

    def _load(self, session: Session, entities: Iterable[str]) -> dict[str, Row]:
        by_kind: dict[str, list[tuple[Any, ...]]] = defaultdict(list)
        for e in entities:
            by_kind[kind_of(e)].append(_pk(e))
        out: dict[str, Row] = {}
        for kind, pks in by_kind.items():
            table, cols = TABLES[kind], [TABLES[kind].c[k] for k in _keys(kind)]
            for chunk in _chunks(pks):
                cond = cols[0].in_([p[0] for p in chunk]) if len(cols) == 1 else tuple_(*cols).in_(chunk)
                for r in session.execute(select(table).where(cond)).mappings():
                    out[_entity(kind, dict(r))] = dict(r)
        return out

    def _save(self, session: Session, states: dict[str, Row | None], final_block: int) -> None:
        gone: dict[str, list[tuple[Any, ...]]] = defaultdict(list)
        kept: dict[str, list[Row]] = defaultdict(list)
        for e, row in states.items():
            if row is None:
                gone[kind_of(e)].append(_pk(e))
            else:
                kept[kind_of(e)].append(row)
        for kind in reversed(KINDS):
            for chunk in _chunks(gone.get(kind, [])):
                self._delete(session, kind, chunk)
        for kind in KINDS:
            rows = kept.get(kind, [])
            upsert(session, TABLES[kind], [self._table_row(r, final_block) for r in rows])
            if kind == "adapter":
                self._insert_lineage(session, rows)

    def _table_row(self, row: Row, final_block: int) -> Row:
        cols = {k: v for k, v in row.items() if not k.startswith("_")}
        return {**cols, "is_final": row["updated_block"] <= final_block}

    def _delete(self, session: Session, kind: str, pks: Sequence[tuple[Any, ...]]) -> None:
        table, cols = TABLES[kind], [TABLES[kind].c[k] for k in _keys(kind)]
        if kind == "adapter":
            session.execute(delete(LINEAGE).where(LINEAGE.c.adapter_id.in_([p[0] for p in pks])))
        cond = cols[0].in_([p[0] for p in pks]) if len(cols) == 1 else tuple_(*cols).in_(pks)
        session.execute(delete(table).where(cond))

    def _insert_lineage(self, session: Session, rows: list[Row]) -> None:
        lineage = [{"adapter_id": r["adapter_id"], "position": i, "dataset_id": d, "weight_bps": w,
                    "block_number": r["block_number"]}
                   for r in rows if "_lineage" in r for i, (d, w) in enumerate(r["_lineage"])]
        insert_new(session, LINEAGE, lineage, ("adapter_id", "position"), ("adapter_id",))

    def _sync_outbox(self, session: Session) -> None:
        """Move settlement epochs the chain has settled with their roots to `confirmed`, then `final`; back
        to `submitted` when a reorg removed their `EpochSettled`. The roots must match: after a guardian's
        amend the node settles a forgotten epoch's id again, and the mirror's row for that id is the
        forgotten epoch's until the new `EpochSettled` comes (tests/adversarial/test_guardian_amend.py)."""
        s, o = table_of(SettledEpoch), table_of(SettlementEpoch)
        same = and_(s.c.node == o.c.node, s.c.epoch_id == o.c.epoch_id, s.c.rewards_root == o.c.rewards_root,
                    s.c.receipts_root == o.c.receipts_root)
        now = datetime.now(UTC)
        sent = o.c.state.in_([EpochState.BUILT, EpochState.SUBMITTED])
        session.execute(update(o).where(sent, exists().where(same))
                        .values(state=EpochState.CONFIRMED, confirmed_at=now))
        session.execute(update(o).where(o.c.state == EpochState.CONFIRMED, ~exists().where(same))
                        .values(state=EpochState.SUBMITTED, confirmed_at=None))
        session.execute(update(o).where(o.c.state == EpochState.CONFIRMED, exists().where(same, s.c.is_final))
                        .values(state=EpochState.FINAL, finalized_at=now))


def _chunks(items: Sequence[Any]) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), CHUNK):
        yield items[i:i + CHUNK]
