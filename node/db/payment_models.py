"""The payer's money, apart from the lanes and vouchers in `node.db.models`:

- the chain mirror of what each payer holds (`EscrowAccount`s of PaymentEscrow, `ChannelAccount`s of
  the x402 channel contract) and what Settlement collected per lane (`LaneCollection`), written only by
  the indexer;
- the node's own record of each x402 channel that pays it (`X402Channel`).

`node.db.models` imports this module, so `Base.metadata` (migrations, autogenerate) holds these tables.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, String
from sqlalchemy.orm import Mapped, mapped_column

from node.db.base import Base, BigId, ChainRow
from node.db.types import Address, Amount, Hash32, UTCDateTime, utc_now


class EscrowAccount(ChainRow, Base):
    """PaymentEscrow's account of one (payer, node), as of `updated_block`."""

    __tablename__ = "escrow_accounts"

    payer: Mapped[str] = mapped_column(Address(), primary_key=True)
    node: Mapped[str] = mapped_column(Address(), primary_key=True)
    balance: Mapped[int] = mapped_column(Amount(), nullable=False)
    thawing: Mapped[int] = mapped_column(Amount(), nullable=False)
    thaw_end_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    deposited: Mapped[int] = mapped_column(Amount(), nullable=False)
    withdrawn: Mapped[int] = mapped_column(Amount(), nullable=False)
    collected: Mapped[int] = mapped_column(Amount(), nullable=False)
    # deposits in `balance` not final yet (a payer may not spend them), and the chain head at which the
    # latest of them is finality_depth deep (None: nothing pending)
    pending_deposits: Mapped[int] = mapped_column(Amount(), nullable=False, default=0)
    pending_until_block: Mapped[int | None] = mapped_column(BigInteger)
    # what was thawing as of the last final block, less what was withdrawn since, and when that thaw ends:
    # a reorg can bring back a thaw cancelled, lowered or restarted above it, so the hold counts the larger
    # of this and `thawing`, and settlement the sooner of the two ends
    final_thawing: Mapped[int] = mapped_column(Amount(), nullable=False, default=0)
    final_thaw_end_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class ChannelAccount(ChainRow, Base):
    """One x402 batch-settlement channel of the channel contract (`channels`, `pendingWithdrawals`,
    `refundNonce` on chain), as of `updated_block` (docs/x402.md, "The channel mirror")."""

    __tablename__ = "channel_accounts"

    channel_id: Mapped[str] = mapped_column(Hash32(), primary_key=True)
    payer: Mapped[str] = mapped_column(Address(), nullable=False)
    receiver: Mapped[str | None] = mapped_column(Address())  # from ChannelCreated or the first claim
    balance: Mapped[int] = mapped_column(Amount(), nullable=False)
    total_claimed: Mapped[int] = mapped_column(Amount(), nullable=False)
    deposited: Mapped[int] = mapped_column(Amount(), nullable=False)
    refunded: Mapped[int] = mapped_column(Amount(), nullable=False)
    withdrawn: Mapped[int] = mapped_column(Amount(), nullable=False)
    pending_withdrawal: Mapped[int] = mapped_column(Amount(), nullable=False)
    withdraw_ready_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    refund_nonce: Mapped[int] = mapped_column(BigInteger, nullable=False)
    # deposits in `balance` not final yet, and the head at which the latest is finality_depth deep
    pending_deposits: Mapped[int] = mapped_column(Amount(), nullable=False, default=0)
    pending_until_block: Mapped[int | None] = mapped_column(BigInteger)
    # the pending withdrawal as of the last final block, less what was withdrawn or refunded since, and when
    # it is ready: a reorg can bring back one lowered or restarted above it (the hold counts the larger)
    final_pending_withdrawal: Mapped[int] = mapped_column(Amount(), nullable=False, default=0)
    final_withdraw_ready_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class LaneCollection(ChainRow, Base):
    """What Settlement has collected on one lane (`collected[payer][node][lane]` on chain)."""

    __tablename__ = "lane_collections"

    payer: Mapped[str] = mapped_column(Address(), primary_key=True)
    node: Mapped[str] = mapped_column(Address(), primary_key=True)
    lane: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    collected: Mapped[int] = mapped_column(Amount(), nullable=False)
    last_cumulative: Mapped[int] = mapped_column(Amount(), nullable=False)


class X402Channel(Base):
    """An x402 batch-settlement channel paying this node (docs/x402.md): its id is also its lane of the
    node's router (`vouchers.payer` = the router), and the latest voucher its payer signed, which is
    what the router claims with."""

    __tablename__ = "x402_channels"

    lane: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    channel_id: Mapped[str] = mapped_column(Hash32(), nullable=False, unique=True)
    node: Mapped[str] = mapped_column(Address(), nullable=False)
    payer: Mapped[str] = mapped_column(Address(), nullable=False)
    config: Mapped[dict[str, Any]] = mapped_column(JSON(), nullable=False)
    signed_max: Mapped[int] = mapped_column(Amount(), nullable=False, default=0)
    signature: Mapped[str | None] = mapped_column(String(132))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, default=utc_now)
    # the charged total at the channel's latest cooperative refund (its voucher's ceiling: the refund
    # voucher is the same bytes at that total) and whether that refund left a balance (a partial one)
    refund_total: Mapped[int | None] = mapped_column(Amount())
    refund_was_partial: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    # gas the node spent on the channel's gasless transactions: its deposits (as mined) and its refunds (at
    # REFUND_GAS each): what the channel's fees must cover before a gasless refund (x402/gas_cover.py)
    node_gas: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
