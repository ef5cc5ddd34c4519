"""What the ledger reads and writes per lane, and the transaction port its two SQL backends implement:

    lane_sqlite.SQLiteLanes    SQLAlchemy Core, one statement per step, a process-wide lock per hold
    lane_pg.PipelinedLanes     PostgreSQL: written-out SQL, psycopg pipeline, an advisory lock per hold

A transaction is opened by `transaction(lock_payer, node)`; with `lock_payer` it is a hold's, taken
under the (payer, node) lock that every API process of the node shares; with `lock_lane` too, under
that one lane's lock (for a payer whose lanes are separate accounts: the x402 router, docs/x402.md).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from node.payment.hold_rule import HoldRequest


@dataclass(frozen=True)
class LaneRow:
    charged_total: int
    last_cumulative: int
    reserved_voucher_hash: str | None
    reserved_at: datetime | None
    reserved_by: str | None  # the API process that placed the hold


NEW_LANE = LaneRow(0, 0, None, None, None)


@dataclass(frozen=True)
class HoldView:
    """What `reserve` decides on, read under the (payer, node) lock."""

    is_used: bool  # the voucher was accepted before
    response: dict[str, Any] | None  # the response it bought, while within the idempotency window
    lane: LaneRow  # the voucher's lane (NEW_LANE if never used)
    balance: int  # escrow, as mirrored
    thawing: int
    uncollected: int  # charged on all lanes of (payer, node), not yet collected, and not written off for good
    other_holds: int  # the live holds on the other lanes
    pending_deposits: int = 0  # deposits in `balance` that are not final yet: not spendable
    pending_until_block: int | None = None  # the chain head at which they are
    final_thawing: int = 0  # thawing as of the last final block, less withdrawn since: counted when above `thawing`


class LaneTransaction(Protocol):
    def hold_view(self, payer: str, node: str, lane: int, voucher_hash: str, live_since: datetime) -> HoldView:
        """The voucher's use, the lane, the escrow, and the totals over the payer's lanes."""

    def lane_view(self, payer: str, node: str, lane: int, voucher_hash: str) -> HoldView:
        """The voucher's use and its lane only (escrow and the payer's totals left at 0): for a payer whose
        lanes are separate accounts, checked each against a deposit of its own (the x402 router's
        channels), so one request reads one lane however many the payer has."""

    def put_hold(self, payer: str, node: str, lane: int, max_fee: int, voucher_hash: str, now: datetime,
                 owner: str) -> None:
        """Hold `max_fee` on the lane for `voucher_hash`, placed by API process `owner`, creating the
        lane on first use."""

    def charge(self, voucher: dict[str, Any], receipt: dict[str, Any], charged_before: int,
               held_since: datetime, owner: str) -> bool:
        """Turn the lane's hold into its charge and store the voucher (with its response) and the
        receipt, all or nothing: False (nothing written) if the hold is no longer this voucher's placed
        by `owner`, was placed before `held_since` (expired), or the lane was charged since. (PostgreSQL commits here,
        to learn the outcome in the same round trip; nothing else may follow in that transaction.)"""

    def drop_hold(self, payer: str, node: str, lane: int, voucher_hash: str, owner: str) -> None:
        """Release the lane's hold if it is still `voucher_hash`'s, placed by `owner`."""


class Lanes(Protocol):
    def hold(self, request: HoldRequest) -> tuple[HoldView, bool]:
        """In a transaction of its own, under the (payer, node) lock: `hold_view` of the request's voucher
        and lane, and whether the hold was placed: only when the voucher is unused and fresh and
        `hold_rule.refusal` finds nothing against it (PostgreSQL: decided and written by one statement,
        one round trip)."""

    def charge(self, voucher: dict[str, Any], receipt: dict[str, Any], charged_before: int,
               held_since: datetime, owner: str) -> bool:
        """`LaneTransaction.charge` in a transaction of its own (PostgreSQL: one statement)."""

    def drop_hold(self, payer: str, node: str, lane: int, voucher_hash: str, owner: str) -> None:
        """`LaneTransaction.drop_hold` in a transaction of its own (PostgreSQL: one statement)."""

    def transaction(self, lock_payer: str | None = None, node: str = "",
                    lock_lane: int | None = None) -> AbstractContextManager[LaneTransaction]:
        """A transaction, committed when the block ends; rolled back if it raises."""
