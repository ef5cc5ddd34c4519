"""The node's books of its x402 channels: each channel's lane of the router (its id in
`x402_channels`) and the highest voucher its payer signed (what the router claims with).

A voucher is recorded once it passed every check, before the generation: its ceiling covers every
charge the node makes on it, so keeping the highest one seen is always safe to claim with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, bindparam, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from node.db.payment_models import X402Channel
from node.payment.x402.typed import ChannelConfig
from node.protocol.hexstr import from_hex, to_hex


@dataclass(frozen=True)
class ChannelEntry:
    lane: int
    signed_max: int
    signature: bytes | None


@dataclass(frozen=True)
class RefundMark:
    """The channel's latest cooperative refund: the charged total it was asked at (its voucher's ceiling)
    and whether it left a balance."""

    total: int
    was_partial: bool


class ChannelBook:
    def __init__(self, factory: sessionmaker[Session], node: str) -> None:
        self.factory = factory
        self.node = node.lower()
        self._lanes: dict[bytes, int] = {}  # a channel's lane never changes: kept once read

    def lane_of(self, channel_id: bytes, config: ChannelConfig) -> int:
        lane = self._lanes.get(channel_id)
        if lane is None:
            lane = self._lanes[channel_id] = self.entry(channel_id, config).lane
        return lane

    def find_lane(self, channel_id: bytes) -> int | None:
        """The channel's lane if it is in the books already (nothing written)."""
        lane = self._lanes.get(channel_id)
        if lane is None:
            with self.factory() as session:
                lane = session.scalar(select(X402Channel.lane).where(X402Channel.channel_id == to_hex(channel_id)))
        return lane

    def entry(self, channel_id: bytes, config: ChannelConfig) -> ChannelEntry:
        """The channel's lane and latest voucher, creating its row on first sight."""
        key = to_hex(channel_id)
        with self.factory() as session:
            row = session.scalars(select(X402Channel).where(X402Channel.channel_id == key)).first()
            if row is None:
                session.add(X402Channel(channel_id=key, node=self.node, payer=config.payer.lower(),
                                        config=config.to_json(), signed_max=0, signature=None))
                try:
                    session.commit()
                except IntegrityError:  # another process created it first
                    session.rollback()
                row = session.scalars(select(X402Channel).where(X402Channel.channel_id == key)).one()
            return ChannelEntry(row.lane, row.signed_max, from_hex(row.signature) if row.signature else None)

    def payer_of(self, lane: int) -> str | None:
        """The payer of the channel that is the router's `lane` (None: no such channel): who may read the
        text of that lane's receipts."""
        with self.factory() as session:
            return session.scalars(select(X402Channel.payer).where(X402Channel.lane == lane,
                                                                    X402Channel.node == self.node)).first()

    def refund_mark(self, channel_id: bytes) -> RefundMark | None:
        with self.factory() as session:
            row = session.execute(select(X402Channel.refund_total, X402Channel.refund_was_partial)
                                  .where(X402Channel.channel_id == to_hex(channel_id))).first()
        return None if row is None or row.refund_total is None else RefundMark(row.refund_total,
                                                                               row.refund_was_partial)

    def record_refund(self, channel_id: bytes, mark: RefundMark | None) -> None:
        """Keep the refund the node is about to send as the channel's latest (before it is sent: a refund
        pending counts as one), or put back the one before it (None: none)."""
        total, was_partial = (None, False) if mark is None else (mark.total, mark.was_partial)
        with self.factory.kw["bind"].begin() as conn:
            conn.execute(update(X402Channel).where(X402Channel.channel_id == to_hex(channel_id))
                         .values(refund_total=total, refund_was_partial=was_partial))

    def node_gas(self, channel_id: bytes) -> int:
        """Gas the node spent on the channel's gasless transactions so far (0: none, or no such row)."""
        with self.factory() as session:
            gas = session.scalar(select(X402Channel.node_gas).where(X402Channel.channel_id == to_hex(channel_id)))
        return int(gas or 0)

    def add_gas(self, channel_id: bytes, config: ChannelConfig, gas: int) -> None:
        """Count `gas` the node spent on a transaction of the channel's (a deposit, a refund), the channel
        written down first if it is not yet (its deposit is in: no stranger's empty channel)."""
        if gas <= 0:
            return
        self.lane_of(channel_id, config)
        with self.factory.kw["bind"].begin() as conn:
            conn.execute(update(X402Channel).where(X402Channel.channel_id == to_hex(channel_id))
                         .values(node_gas=X402Channel.node_gas + gas))

    def record_voucher(self, channel_id: bytes, max_claimable: int, signature: bytes, tx: Any = None) -> None:
        """Keep the voucher if its ceiling is the highest seen (a checked voucher only). With `tx`, the
        hold's lane transaction (under the router's payer lock): written and committed with the hold."""
        key, sig = to_hex(channel_id), to_hex(signature)
        conn = getattr(tx, "conn", None)
        if conn is not None and not isinstance(conn, Connection):  # PostgreSQL's pipelined hold: queued with it
            conn.execute(_RECORD_PG, {"id": key, "max": max_claimable, "sig": sig})
            return
        params = {"k_id": key, "k_max": max_claimable, "v_max": max_claimable, "v_sig": sig}
        if conn is not None:
            conn.execute(_RECORD, params)
            return
        with self.factory.kw["bind"].begin() as own:  # one Core statement: no ORM session per request
            own.execute(_RECORD, params)


# built once (its compiled form is cached): a statement built per request cost more than the write
_RECORD = (update(X402Channel)
           .where(X402Channel.channel_id == bindparam("k_id"), X402Channel.signed_max < bindparam("k_max"))
           .values(signed_max=bindparam("v_max"), signature=bindparam("v_sig")))


_RECORD_PG = ("UPDATE x402_channels SET signed_max = %(max)s, signature = %(sig)s "
              "WHERE channel_id = %(id)s AND signed_max < %(max)s")
