"""The settlement outbox in the database: what is waiting, opening an epoch, and its inputs.

Every function takes a Session (the caller owns the transaction) and returns plain values; an epoch's
intent keys are read from the TxManager's store.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import ColumnElement, delete, exists, func, or_, select, tuple_, update
from sqlalchemy.orm import Session

from node.attribution.evidence import stated_weights
from node.attribution.rule import METHOD_EVIDENCE
from node.chain.contracts import EMPTY_LINEAGE_HASH, lineage_hash
from node.chain.tx_manager import TxStore
from node.db import queries
from node.db.loss import RECOVERABLE, is_settlement_loss
from node.db.models import EpochState, Loss, Receipt, SettledEpoch, SettlementEpoch, Voucher
from node.db.payment_models import EscrowAccount
from node.errors import MirrorUnavailable
from node.protocol.hexstr import to_hex
from node.protocol.receipt import BASE_ADAPTER_ID, receipt_of_row
from node.protocol.voucher import SignedVoucher
from node.settlement.epoch_builder import EpochReceipt
from node.settlement.split import BASE_LINEAGE, Lineage

log = logging.getLogger(__name__)
IN_FLIGHT = (EpochState.OPEN, EpochState.BUILT, EpochState.SUBMITTED, EpochState.CONFIRMED)


def intent_key(node: str, epoch_id: int, attempt: int = 0) -> str:
    """The TxManager intent of an epoch's settle (each rebuild of a failed epoch is a new attempt)."""
    return f"settle:{node.lower()}:{epoch_id}" + (f":{attempt}" if attempt else "")


def attempt_of(row: SettlementEpoch) -> int:
    return int((row.batch or {}).get("attempt", 0))


def fresh_attempt(store: TxStore, node: str, epoch_id: int, attempt: int) -> int:
    """The first attempt number from `attempt` whose intent key no earlier send has used."""
    while store.load(intent_key(node, epoch_id, attempt)) is not None:
        attempt += 1
    return attempt


@dataclass(frozen=True)
class Transition:
    """A state an epoch moves to, with what its send left: the settle's hash and nonce, or its error."""

    state: EpochState
    tx_hash: str | None = None
    nonce: int | None = None
    error: str | None = None


STAMPS = {EpochState.SUBMITTED: "submitted_at", EpochState.CONFIRMED: "confirmed_at",
          EpochState.FINAL: "finalized_at"}


def record(session: Session, node: str, epoch_id: int, to: Transition) -> None:
    """Move the epoch to `to.state`, stamping the first time it reached it; facts it does not carry stay."""
    row = epoch_row(session, node, epoch_id)
    assert row is not None
    if row.state != to.state:
        log.info("epoch %d of %s: %s -> %s", epoch_id, node, row.state.value, to.state.value)
    if to.state in STAMPS and getattr(row, STAMPS[to.state]) is None:
        setattr(row, STAMPS[to.state], datetime.now(UTC))
    row.state = to.state
    row.tx_hash = to.tx_hash or row.tx_hash
    row.nonce = row.nonce if to.nonce is None else to.nonce
    row.error = to.error or row.error


@dataclass(frozen=True)
class Pending:
    """Receipts of a node not yet in any epoch (of the lanes worth their gas)."""

    num_receipts: int
    total_fee: int
    max_receipt_id: int | None
    oldest_at: datetime | None
    earliest_deadline: int | None  # unix seconds: the soonest-expiring voucher among them
    num_lanes: int = 0


def _not_lost() -> ColumnElement[bool]:
    """A receipt settlement has not recorded as a loss: a lost receipt never waits for an epoch again;
    only its lane's next valid voucher brings it back (`lost_receipts`, `recover`)."""
    return ~exists().where(Loss.node == Receipt.node, Loss.voucher_hash == Receipt.voucher_hash,
                           Loss.epoch_id.is_not(None))


def pending(session: Session, node: str, min_lane_fee: int = 0, max_lanes: int | None = None,
            may_withdraw_by: int | None = None, settle_fee: int = 0) -> Pending:
    """The receipts waiting for an epoch, of the lanes whose waiting fees reach `min_lane_fee` (the gas
    their voucher costs the settle: a lane below it waits, `docs/settlement.md`). Given `max_lanes`, only
    those of the lanes an epoch opened now would take (`epoch_lanes`, same arguments): what `is_due`
    judges is then the epoch `open_epoch` opens."""
    lanes = session.execute(
        select(Voucher.payer, Voucher.lane, func.count(), func.amount_total(Receipt.fee), func.max(Receipt.id),
               func.min(Receipt.created_at), func.min(Voucher.deadline))
        .join(Voucher, Voucher.voucher_hash == Receipt.voucher_hash)
        .where(Receipt.node == node.lower(), Receipt.epoch_id.is_(None), _not_lost())
        .group_by(Voucher.payer, Voucher.lane)).all()  # one row a lane, summed in SQL: never a row a receipt
    worth = [r for r in lanes if int(r[3]) >= min_lane_fee]
    if worth and max_lanes is not None:
        taken = set(epoch_lanes(session, node, max(int(r[4]) for r in worth), max_lanes, min_lane_fee,
                                may_withdraw_by, settle_fee))
        worth = [r for r in worth if (r[0], r[1]) in taken]
    if not worth:
        return Pending(0, 0, None, None, None)
    return Pending(sum(int(r[2]) for r in worth), sum(int(r[3]) for r in worth), max(int(r[4]) for r in worth),
                   min(r[5] for r in worth), min(int(r[6]) for r in worth), len(worth))


def unfinished(session: Session, node: str) -> SettlementEpoch | None:
    """The node's oldest epoch that is neither final nor failed."""
    q = (select(SettlementEpoch).where(SettlementEpoch.node == node.lower(), SettlementEpoch.state.in_(IN_FLIGHT))
         .order_by(SettlementEpoch.epoch_id).limit(1))
    return session.scalars(q).first()


def in_flight(session: Session, node: str) -> list[SettlementEpoch]:
    """The node's epochs that are neither final nor failed, oldest first."""
    q = select(SettlementEpoch).where(SettlementEpoch.node == node.lower(), SettlementEpoch.state.in_(IN_FLIGHT))
    return list(session.scalars(q.order_by(SettlementEpoch.epoch_id)))


def later(session: Session, node: str, epoch_id: int) -> list[SettlementEpoch]:
    """The node's epochs after `epoch_id`, oldest first."""
    q = select(SettlementEpoch).where(SettlementEpoch.node == node.lower(), SettlementEpoch.epoch_id > epoch_id)
    return list(session.scalars(q.order_by(SettlementEpoch.epoch_id)))


def last_final_epoch_id(session: Session, node: str) -> int:
    q = select(func.max(SettlementEpoch.epoch_id)).where(SettlementEpoch.node == node.lower(),
                                                         SettlementEpoch.state == EpochState.FINAL)
    return int(session.scalar(q) or 0)


def failed(session: Session, node: str) -> SettlementEpoch | None:
    q = select(SettlementEpoch).where(SettlementEpoch.node == node.lower(),
                                      SettlementEpoch.state == EpochState.FAILED)
    return session.scalars(q.order_by(SettlementEpoch.epoch_id).limit(1)).first()


def epoch_row(session: Session, node: str, epoch_id: int) -> SettlementEpoch | None:
    q = select(SettlementEpoch).where(SettlementEpoch.node == node.lower(), SettlementEpoch.epoch_id == epoch_id)
    return session.scalars(q).first()


def last_epoch_id(session: Session, node: str) -> int:
    q = select(func.max(SettlementEpoch.epoch_id)).where(SettlementEpoch.node == node.lower())
    return int(session.scalar(q) or 0)


def open_epoch(session: Session, node: str, epoch_id: int, max_receipt_id: int, max_lanes: int,
               min_lane_fee: int = 0, may_withdraw_by: int | None = None, settle_fee: int = 0) -> int:
    """Insert epoch `epoch_id` (OPEN) and give it the unassigned receipts up to `max_receipt_id` of at most
    `max_lanes` lanes: `settle` collects one voucher per lane, and a batch no block can hold would stop
    every payee's settlement. The other lanes wait for the next epoch, so the lanes taken are those whose
    money stops being collectable soonest (`collect_by`), then those waiting longest. A lane whose waiting
    fees are below `min_lane_fee` (less than its voucher's gas) is not taken: it waits, and takes no
    place from a lane that pays for itself. A payer whose thaw ends by `may_withdraw_by` (the settle's
    landing) may withdraw ahead of the settle and revert it: its lanes are settled alone (`at_risk_first`),
    when they pay for a settle of their own (`settle_fee` + `min_lane_fee` a lane). The lanes taken pay for
    the settle together, or none is taken (`epoch_lanes`). None taken: 0."""
    session.add(SettlementEpoch(node=node.lower(), epoch_id=epoch_id, state=EpochState.OPEN))
    session.flush()
    taken = epoch_lanes(session, node, max_receipt_id, max_lanes, min_lane_fee, may_withdraw_by, settle_fee)
    waiting = (Receipt.node == node.lower(), Receipt.epoch_id.is_(None), Receipt.id <= max_receipt_id, _not_lost())
    chosen = select(Voucher.voucher_hash).where(tuple_(Voucher.payer, Voucher.lane).in_(taken))
    result = session.execute(update(Receipt).where(*waiting, Receipt.voucher_hash.in_(chosen))
                             .values(epoch_id=epoch_id).execution_options(synchronize_session=False))
    return int(result.rowcount)  # type: ignore[attr-defined]


def epoch_lanes(session: Session, node: str, max_receipt_id: int, max_lanes: int, min_lane_fee: int = 0,
                may_withdraw_by: int | None = None, settle_fee: int = 0) -> list[tuple[str, int]]:
    """The lanes (payer, lane) an epoch opened now takes (`open_epoch`); none when their fees do not pay for
    the settle (`settle_fee` + `min_lane_fee` a lane). When the most urgent `max_lanes` do not, the
    `max_lanes` richest do if any lanes can: lanes just worth their own gas, due first, never hold up
    a lane that pays for the settle. A lane no voucher of which is valid when the settle lands
    (`may_withdraw_by`: every one expired, e.g. while the worker was down) takes no place: it rides along
    with whatever is taken, its receipts recorded as lost by the build (their deadlines, the soonest,
    once put them first and left the settle short of live lanes)."""
    waiting = (Receipt.node == node.lower(), Receipt.epoch_id.is_(None), Receipt.id <= max_receipt_id, _not_lost())
    rows = session.execute(select(Voucher.payer, Voucher.lane, func.min(Voucher.deadline), func.min(Receipt.id),
                                  func.max(Voucher.deadline), func.amount_total(Receipt.fee))
                           .join(Receipt, Receipt.voucher_hash == Voucher.voucher_hash).where(*waiting)
                           .group_by(Voucher.payer, Voucher.lane)).all()
    expired = [may_withdraw_by is not None and int(r[4]) < may_withdraw_by for r in rows]
    dead = [(r[0], r[1]) for r, gone in zip(rows, expired, strict=True) if gone]
    lanes = [(*r[:4], r[5]) for r, gone in zip(rows, expired, strict=True) if not gone]  # payer lane deadline id fee
    thaw_ends = _thaw_ends(session, node)
    worth = [r for r in lanes if int(r[4]) >= min_lane_fee]
    urgent = sorted(worth, key=lambda r: (collect_by(r[2], thaw_ends.get(r[0])), r[3]))
    if may_withdraw_by is not None:
        urgent = at_risk_first(urgent, thaw_ends, may_withdraw_by, lambda n: settle_fee + n * min_lane_fee)

    def pays(rows: list[Any]) -> bool:
        return sum(int(r[4]) for r in rows) >= settle_fee + min_lane_fee * len(rows)

    taken = urgent[:max_lanes]
    if not pays(taken):
        taken = sorted(urgent, key=lambda r: (-int(r[4]), r[3]))[:max_lanes]
        taken = taken if pays(taken) else []
    return [(payer, lane) for payer, lane, *_ in taken] + dead


def at_risk_first(lanes: list[Any], thaw_ends: dict[str, int], may_withdraw_by: int,
                  settle_cost: Callable[[int], int] = lambda _n: 0) -> list[Any]:
    """Of `lanes` (payer, lane, ..., fee; most urgent first): the most urgent payer's lanes alone when its
    thaw ends by `may_withdraw_by`, else the lanes of every payer whose thaw does not. A payer that can
    withdraw before the settle lands passes its preflight and may still withdraw ahead of it with a higher
    tip, reverting the whole settle: alone, it costs the node one settle of its own lanes (~74k gas when it
    reverts), never the gas of every honest lane in a batch, and never holds an honest lane in a reverted
    settle. Such a payer whose lanes' fees do not pay for a settle of their own (`settle_cost` of its
    number of lanes) is left out: it waits like a dust lane."""
    def at_risk(payer: str) -> bool:
        return thaw_ends.get(payer, may_withdraw_by + 1) <= may_withdraw_by

    fees: Counter[str] = Counter()
    num_lanes: Counter[str] = Counter()
    for r in lanes:
        fees[r[0]] += int(r[-1])
        num_lanes[r[0]] += 1
    alone = [r for r in lanes if not at_risk(r[0]) or fees[r[0]] >= settle_cost(num_lanes[r[0]])]
    if alone and at_risk(alone[0][0]):
        return [r for r in alone if r[0] == alone[0][0]]
    return [r for r in alone if not at_risk(r[0])]


def collect_by(earliest_deadline: int, thaw_end: int | None) -> int:
    """Until when (unix seconds) a lane's waiting receipts can all be collected: its soonest voucher
    deadline, or the end of its payer's thaw when sooner (the payer may withdraw then)."""
    return earliest_deadline if thaw_end is None else min(earliest_deadline, thaw_end)


def _thaw_ends(session: Session, node: str) -> dict[str, int]:
    """The node's payers with a thaw under way, as the mirror has them or as of the last final block
    (a reorg can drop a cancel or a restart above it): payer -> the sooner end."""
    a = EscrowAccount
    q = select(a.payer, a.thawing, a.thaw_end_at, a.final_thawing, a.final_thaw_end_at).where(
        a.node == node.lower(), or_(a.thawing > 0, a.final_thawing > 0))
    ends: dict[str, int] = {}
    for payer, thawing, end_at, final_thawing, final_end_at in session.execute(q).all():
        under_way = [end for amount, end in ((thawing, end_at), (final_thawing, final_end_at)) if amount and end]
        if under_way:
            ends[payer] = int(min(under_way).timestamp())
    return ends


def detach(session: Session, node: str, epoch_id: int, receipt_ids: list[int] | None = None) -> None:
    """Take receipts out of epoch `epoch_id` (all of them when `receipt_ids` is None): lost ones stay out
    for good (a receipt this epoch recovered is lost again), the others wait for a later epoch."""
    q = update(Receipt).where(Receipt.node == node.lower(), Receipt.epoch_id == epoch_id)
    hashes = select(Receipt.voucher_hash).where(Receipt.node == node.lower(), Receipt.epoch_id == epoch_id)
    if receipt_ids is not None:
        q, hashes = q.where(Receipt.id.in_(receipt_ids)), hashes.where(Receipt.id.in_(receipt_ids))
    session.execute(update(Loss).where(Loss.node == node.lower(), Loss.recovered_epoch_id == epoch_id,
                                       Loss.voucher_hash.in_(hashes))
                    .values(recovered_epoch_id=None).execution_options(synchronize_session=False))
    session.execute(q.values(epoch_id=None).execution_options(synchronize_session=False))


def dissolve(session: Session, node: str, epoch_id: int) -> None:
    """Delete epoch `epoch_id` (never sent, or refused for good): its receipts wait for a later epoch."""
    detach(session, node, epoch_id)
    session.execute(delete(SettlementEpoch).where(SettlementEpoch.node == node.lower(),
                                                  SettlementEpoch.epoch_id == epoch_id))


def epoch_receipts(session: Session, node: str, epoch_id: int) -> list[EpochReceipt]:
    """The epoch's receipts with their vouchers, in id order (the receipts tree's value order)."""
    q = (select(Receipt, Voucher).join(Voucher, Voucher.voucher_hash == Receipt.voucher_hash)
         .where(Receipt.node == node.lower(), Receipt.epoch_id == epoch_id).order_by(Receipt.id))
    return [_epoch_receipt(r, v) for r, v in session.execute(q).all()]


def lost_receipts(session: Session, node: str, lanes: set[tuple[str, int]]) -> list[EpochReceipt]:
    """The receipts of `lanes` (payer, lane) that settlement lost but the lane's next valid voucher can
    still collect (expired, escrow short), in id order."""
    if not lanes:
        return []
    q = (select(Receipt, Voucher).join(Voucher, Voucher.voucher_hash == Receipt.voucher_hash)
         .join(Loss, (Loss.node == Receipt.node) & (Loss.voucher_hash == Receipt.voucher_hash))
         .where(Receipt.node == node.lower(), Receipt.epoch_id.is_(None), is_settlement_loss(),
                Loss.reason.in_([r.value for r in RECOVERABLE]),
                tuple_(Voucher.payer, Voucher.lane).in_(sorted(lanes)))
         .order_by(Receipt.id))
    return [_epoch_receipt(r, v) for r, v in session.execute(q).all()]


def recover(session: Session, node: str, epoch_id: int, receipts: list[EpochReceipt]) -> None:
    """Put lost `receipts` into epoch `epoch_id`, which collects them: their losses are recovered."""
    if not receipts:
        return
    ids, hashes = [r.receipt_id for r in receipts], [r.voucher_hash for r in receipts]
    session.execute(update(Receipt).where(Receipt.node == node.lower(), Receipt.id.in_(ids))
                    .values(epoch_id=epoch_id).execution_options(synchronize_session=False))
    session.execute(update(Loss).where(Loss.node == node.lower(), Loss.voucher_hash.in_(hashes), is_settlement_loss())
                    .values(recovered_epoch_id=epoch_id).execution_options(synchronize_session=False))


def lanes_lost(session: Session, node: str, epoch_id: int) -> int:
    """How many lanes (payer, lane) settlement took out of epoch `epoch_id` as losses."""
    lanes = (select(Loss.payer, Loss.lane).where(Loss.node == node.lower(), Loss.epoch_id == epoch_id)
             .distinct().subquery())
    return int(session.scalar(select(func.count()).select_from(lanes)) or 0)


def recovered_in(session: Session, node: str, epoch_id: int) -> set[str]:
    """The voucher hashes of the lost receipts epoch `epoch_id` recovered (their loss is already recorded)."""
    q = select(Loss.voucher_hash).where(Loss.node == node.lower(), Loss.recovered_epoch_id == epoch_id)
    return {h for h in session.scalars(q) if h is not None}


def _epoch_receipt(r: Receipt, v: Voucher) -> EpochReceipt:
    weights = stated_weights(r.attribution).weights_bps if r.method == METHOD_EVIDENCE else None
    return EpochReceipt(r.id, receipt_of_row(r), SignedVoucher.from_row(v), weights, v.charged_total)


def payees(session: Session, receipts: list[EpochReceipt]) -> tuple[dict[int, Lineage], dict[str, str]]:
    """Each adapter's payees as the mirror has them (lineage is immutable once registered, a dataset's
    payout is not: its owner may move it); the base model's (adapter id 0) are nobody's but the
    treasury's and the node's. Also the payout of each of their datasets (dataset id as a string ->
    address), which the epoch keeps: its earnings are explained with them (node/settlement/epoch_sources.py)."""
    out: dict[int, Lineage] = {}
    payouts: dict[str, str] = {}
    for r in receipts:
        if r.adapter_id == BASE_ADAPTER_ID:
            out[r.adapter_id] = BASE_LINEAGE
        elif r.adapter_id not in out:
            view = lineage_view(session, r)  # one payout per dataset in the epoch, read once
            out[r.adapter_id] = Lineage(view.owner, view.owner_share_bps, tuple(
                (payouts.setdefault(str(d.dataset_id), d.payout), d.weight_bps) for d in view.datasets))
    return out, payouts


def misattributed(session: Session, receipts: list[EpochReceipt]) -> list[EpochReceipt]:
    """The receipts whose signed lineageHash is not their adapter's as the mirror has it: a method 1
    receipt's must be the registered lineage's, a method 2 receipt's stored weights must be for its
    adapter's datasets and hash to it. (A registration reorged out can hand its adapter id to another
    adapter: its fees must not go to the newcomer's payees.) A base-model receipt (adapter id 0) must
    commit to the empty lineage, with no weights of its own."""
    views: dict[int, queries.AdapterLineageView] = {}
    wrong = []
    for r in receipts:
        if r.adapter_id == BASE_ADAPTER_ID:
            if r.weights_bps is not None or r.lineage_hash.lower() != to_hex(EMPTY_LINEAGE_HASH):
                wrong.append(r)
            continue
        if r.adapter_id not in views:
            views[r.adapter_id] = lineage_view(session, r)
        view = views[r.adapter_id]
        expected = view.lineage_hash if r.weights_bps is None else \
            "0x" + lineage_hash([d.dataset_id for d in view.datasets], r.weights_bps).hex()
        if expected.lower() != r.lineage_hash.lower():
            wrong.append(r)
    return wrong


def lineage_view(session: Session, r: EpochReceipt) -> queries.AdapterLineageView:
    view = queries.adapter_lineage(session, r.adapter_id, at_block=r.registry_block)
    if view is None:
        raise MirrorUnavailable("the mirror lacks an adapter a receipt names", adapter_id=r.adapter_id,
                                registry_block=r.registry_block)
    return view


def is_final_on_mirror(session: Session, node: str, row: SettlementEpoch) -> bool:
    """The indexer has seen this epoch settled with our roots, past its finality depth."""
    settled = session.get(SettledEpoch, (node.lower(), row.epoch_id))
    return (settled is not None and settled.is_final and settled.rewards_root == row.rewards_root
            and settled.receipts_root == row.receipts_root)
