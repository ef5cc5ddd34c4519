"""The tables. Two kinds of rows:

- the chain mirror, written only by the indexer (`ChainRow`s, `raw_events`, `chain_blocks`,
  `indexer_cursor`): every row carries the block it came from, so a reorg rolls it back exactly;
- the node's own records, written by the API and the settlement worker: lanes, vouchers, receipts,
  the settlement outbox and the transaction manager's intents.

The payers' escrow and x402 channel accounts, lane collections and x402 channels are in
`node.db.payment_models`; importing this module registers them on `Base.metadata` too.

Addresses are lower-case 0x-hex (42), hashes 0x-hex (66), amounts `Amount` (uint256 as int).
A database mirrors one chain; raw events still carry the chain id in their key.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Enum,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from node.db import payment_models  # noqa: F401  (its tables belong to Base.metadata)
from node.db.base import Base, BigId, ChainRow
from node.db.types import Address, Amount, Hash32, UTCDateTime, utc_now

# --- the chain mirror ----------------------------------------------------------------------------


class Dataset(ChainRow, Base):
    __tablename__ = "datasets"

    dataset_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    owner: Mapped[str] = mapped_column(Address(), nullable=False)
    content_hash: Mapped[str] = mapped_column(Hash32(), nullable=False)
    uri: Mapped[str] = mapped_column(Text, nullable=False)
    payout: Mapped[str] = mapped_column(Address(), nullable=False)
    tx_hash: Mapped[str] = mapped_column(Hash32(), nullable=False)


class Adapter(ChainRow, Base):
    __tablename__ = "adapters"

    adapter_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    owner: Mapped[str] = mapped_column(Address(), nullable=False)
    base_model: Mapped[str] = mapped_column(Hash32(), nullable=False)
    weights_sha256: Mapped[str] = mapped_column(Hash32(), nullable=False)
    uri: Mapped[str] = mapped_column(Text, nullable=False)
    owner_share_bps: Mapped[int] = mapped_column(Integer, nullable=False)
    lineage_hash: Mapped[str] = mapped_column(Hash32(), nullable=False)
    deprecated_block: Mapped[int | None] = mapped_column(BigInteger)
    tx_hash: Mapped[str] = mapped_column(Hash32(), nullable=False)


class AdapterLineage(Base):
    """One (dataset, weight) of an adapter's lineage, in registration order. Immutable."""

    __tablename__ = "adapter_lineage"

    adapter_id: Mapped[int] = mapped_column(
        ForeignKey("adapters.adapter_id", ondelete="CASCADE"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.dataset_id"), nullable=False, index=True)
    weight_bps: Mapped[int] = mapped_column(Integer, nullable=False)
    block_number: Mapped[int] = mapped_column(BigInteger, nullable=False)


class SettledEpoch(ChainRow, Base):
    """An `EpochSettled` seen on chain (and its veto, if any)."""

    __tablename__ = "settled_epochs"

    node: Mapped[str] = mapped_column(Address(), primary_key=True)
    epoch_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    rewards_root: Mapped[str] = mapped_column(Hash32(), nullable=False)
    rewards_total: Mapped[int] = mapped_column(Amount(), nullable=False)
    receipts_root: Mapped[str] = mapped_column(Hash32(), nullable=False)
    receipt_count: Mapped[int] = mapped_column(BigInteger, nullable=False)
    collected: Mapped[int] = mapped_column(Amount(), nullable=False)
    unlock_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    tx_hash: Mapped[str] = mapped_column(Hash32(), nullable=False)
    vetoed_block: Mapped[int | None] = mapped_column(BigInteger)


class Claim(ChainRow, Base):
    __tablename__ = "claims"

    node: Mapped[str] = mapped_column(Address(), primary_key=True)
    account: Mapped[str] = mapped_column(Address(), primary_key=True)
    epoch_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    amount: Mapped[int] = mapped_column(Amount(), nullable=False)
    cumulative_amount: Mapped[int] = mapped_column(Amount(), nullable=False)
    tx_hash: Mapped[str] = mapped_column(Hash32(), nullable=False)


class RawEvent(Base):
    """Every decoded log, the source the mirror tables are rebuilt from. `entity` names the mirror
    row the event belongs to (e.g. `escrow:<payer>:<node>`); `args` holds uint values as strings."""

    __tablename__ = "raw_events"
    __table_args__ = (UniqueConstraint("chain_id", "tx_hash", "log_index"),
                      Index(None, "entity", "block_number", "log_index"),
                      Index(None, "is_final", "block_number"))

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    chain_id: Mapped[int] = mapped_column(BigInteger, nullable=False)
    block_number: Mapped[int] = mapped_column(BigInteger, nullable=False, index=True)
    block_hash: Mapped[str] = mapped_column(Hash32(), nullable=False)
    tx_hash: Mapped[str] = mapped_column(Hash32(), nullable=False)
    log_index: Mapped[int] = mapped_column(Integer, nullable=False)
    address: Mapped[str] = mapped_column(Address(), nullable=False)
    event: Mapped[str] = mapped_column(String(32), nullable=False)
    entity: Mapped[str] = mapped_column(String(200), nullable=False)
    args: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)
    is_final: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)


class ChainBlock(Base):
    """Hashes of recent blocks (above the finalized one), checked against each new block's parent."""

    __tablename__ = "chain_blocks"

    chain_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    number: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    hash: Mapped[str] = mapped_column(Hash32(), nullable=False)
    parent_hash: Mapped[str] = mapped_column(Hash32(), nullable=False)


class IndexerCursor(Base):
    """The last block whose logs are all in the mirror (and its hash), per chain; the chain it is
    bound to (genesis hash, contracts); and the indexer's health as of its last step."""

    __tablename__ = "indexer_cursor"

    chain_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    last_block: Mapped[int] = mapped_column(BigInteger, nullable=False)
    last_block_hash: Mapped[str | None] = mapped_column(Hash32())
    final_block: Mapped[int] = mapped_column(BigInteger, nullable=False)
    contracts: Mapped[str] = mapped_column(Text, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, default=utc_now)
    genesis_hash: Mapped[str | None] = mapped_column(Hash32())  # None only on mirrors written before 0006
    head_block: Mapped[int | None] = mapped_column(BigInteger)  # the chain head at the last step
    checked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())  # the last step that reached the chain
    stalled_reason: Mapped[str | None] = mapped_column(Text)  # the last step failed (cleared by the next good one)
    halted_reason: Mapped[str | None] = mapped_column(Text)  # the indexer stopped for good (another chain, deep reorg)


# --- the node's own records ----------------------------------------------------------------------


class Node(Base):
    """A node operator address this database serves or settles for."""

    __tablename__ = "nodes"

    address: Mapped[str] = mapped_column(Address(), primary_key=True)
    is_self: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, default=utc_now)


class Lane(Base):
    """A payment lane of (payer, node): what the node has charged, and the last voucher it took."""

    __tablename__ = "lanes"

    payer: Mapped[str] = mapped_column(Address(), primary_key=True)
    node: Mapped[str] = mapped_column(Address(), primary_key=True)
    lane: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    charged_total: Mapped[int] = mapped_column(Amount(), nullable=False, default=0)
    last_cumulative: Mapped[int] = mapped_column(Amount(), nullable=False, default=0)
    last_voucher_hash: Mapped[str | None] = mapped_column(Hash32())
    # the hold of the request in flight on this lane (its max fee), if any; see node/payment/ledger.py
    reserved: Mapped[int] = mapped_column(Amount(), nullable=False, default=0)
    reserved_voucher_hash: Mapped[str | None] = mapped_column(Hash32())
    reserved_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    reserved_by: Mapped[str | None] = mapped_column(String(128))  # the API process that placed the hold
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, default=utc_now)


class Voucher(Base):
    __tablename__ = "vouchers"
    __table_args__ = (Index(None, "payer", "node", "lane"),)

    voucher_hash: Mapped[str] = mapped_column(Hash32(), primary_key=True)
    payer: Mapped[str] = mapped_column(Address(), nullable=False)
    node: Mapped[str] = mapped_column(Address(), nullable=False)
    lane: Mapped[int] = mapped_column(BigInteger, nullable=False)
    cumulative: Mapped[int] = mapped_column(Amount(), nullable=False)
    request_hash: Mapped[str] = mapped_column(Hash32(), nullable=False)
    deadline: Mapped[int] = mapped_column(BigInteger, nullable=False)
    signature: Mapped[str] = mapped_column(String(132), nullable=False)
    charged_total: Mapped[int] = mapped_column(Amount(), nullable=False)
    # the response body sent, kept for idempotent retries of the same voucher for a window
    response: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, default=utc_now)


class EpochState(enum.StrEnum):
    OPEN = "open"
    BUILT = "built"
    SUBMITTED = "submitted"
    CONFIRMED = "confirmed"
    FINAL = "final"
    FAILED = "failed"


class SettlementEpoch(Base):
    """The settlement outbox: one row per (node, epoch), driven by the worker through its states."""

    __tablename__ = "settlement_epochs"
    __table_args__ = (UniqueConstraint("node", "epoch_id"), Index(None, "state"))

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    node: Mapped[str] = mapped_column(Address(), nullable=False)
    epoch_id: Mapped[int] = mapped_column(BigInteger, nullable=False)
    state: Mapped[EpochState] = mapped_column(
        Enum(EpochState, native_enum=False, length=16, values_callable=lambda e: [m.value for m in e],
             validate_strings=True), nullable=False, default=EpochState.OPEN)
    rewards_root: Mapped[str | None] = mapped_column(Hash32())
    rewards_total: Mapped[int | None] = mapped_column(Amount())
    receipts_root: Mapped[str | None] = mapped_column(Hash32())
    receipt_count: Mapped[int | None] = mapped_column(BigInteger)
    collected_total: Mapped[int | None] = mapped_column(Amount())
    trees: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # the settle call's vouchers and amounts, fixed before any broadcast (see node/settlement/build_step.py)
    batch: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    tx_hash: Mapped[str | None] = mapped_column(Hash32())
    nonce: Mapped[int | None] = mapped_column(BigInteger)
    error: Mapped[str | None] = mapped_column(Text)
    opened_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, default=utc_now)
    built_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    submitted_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    confirmed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finalized_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class TxIntent(Base):
    """A transaction intent of the transaction manager (node/chain/tx_store.py): one nonce, and every
    signed attempt at it (fee bumps share the nonce), saved before each broadcast."""

    __tablename__ = "tx_intents"
    __table_args__ = (Index(None, "sender", "nonce"),)

    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    sender: Mapped[str] = mapped_column(Address(), nullable=False)
    nonce: Mapped[int] = mapped_column(BigInteger, nullable=False)
    to: Mapped[str] = mapped_column(Address(), nullable=False)
    data: Mapped[str] = mapped_column(Text, nullable=False)
    value: Mapped[int] = mapped_column(Amount(), nullable=False)
    gas: Mapped[int] = mapped_column(BigInteger, nullable=False)
    state: Mapped[str] = mapped_column(String(16), nullable=False)
    # [{"tx_hash", "max_fee_per_gas", "max_priority_fee_per_gas", "raw", "sent_at"}], uints as strings
    attempts: Mapped[list[dict[str, Any]]] = mapped_column(JSON, nullable=False)
    mined_hash: Mapped[str | None] = mapped_column(Hash32())
    mined_block: Mapped[int | None] = mapped_column(BigInteger)
    error: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, default=utc_now)


class Receipt(Base):
    """A signed attribution receipt: one per voucher, written with it in one transaction."""

    __tablename__ = "receipts"
    __table_args__ = (
        ForeignKeyConstraint(["node", "epoch_id"], ["settlement_epochs.node", "settlement_epochs.epoch_id"]),
        Index(None, "node", "epoch_id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    receipt_hash: Mapped[str] = mapped_column(Hash32(), nullable=False, unique=True)
    voucher_hash: Mapped[str] = mapped_column(
        ForeignKey("vouchers.voucher_hash"), nullable=False, unique=True)
    node: Mapped[str] = mapped_column(Address(), nullable=False)
    adapter_id: Mapped[int] = mapped_column(BigInteger, nullable=False)
    registry_block: Mapped[int] = mapped_column(BigInteger, nullable=False)
    lineage_hash: Mapped[str] = mapped_column(Hash32(), nullable=False)
    prompt_tokens: Mapped[int] = mapped_column(Integer, nullable=False)
    completion_tokens: Mapped[int] = mapped_column(Integer, nullable=False)
    fee: Mapped[int] = mapped_column(Amount(), nullable=False)
    output_hash: Mapped[str] = mapped_column(Hash32(), nullable=False)
    method: Mapped[int] = mapped_column(Integer, nullable=False)
    signature: Mapped[str] = mapped_column(String(132), nullable=False)
    # method 2: the evidence and the weights the lineageHash commits to (node/attribution/evidence.py);
    # settlement splits this receipt's dataset share by them. None for method 1 (the lineage weights).
    attribution: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, default=utc_now)
    epoch_id: Mapped[int | None] = mapped_column(BigInteger)


class Loss(Base):
    """Money the node served but will not collect, with its reason (node/db/loss.py): a charge that
    could not be committed after tokens left the node, or a lane that settlement had to drop."""

    __tablename__ = "losses"
    # a lane's write-offs (queries.uncollected), an epoch's losses and recoveries (epoch_report.losses_of)
    __table_args__ = (Index(None, "node", "payer", "lane"), Index(None, "node", "epoch_id"),
                      Index(None, "node", "recovered_epoch_id"))

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    node: Mapped[str] = mapped_column(Address(), nullable=False)
    payer: Mapped[str] = mapped_column(Address(), nullable=False)
    lane: Mapped[int] = mapped_column(BigInteger, nullable=False)
    amount: Mapped[int] = mapped_column(Amount(), nullable=False)
    reason: Mapped[str] = mapped_column(String(32), nullable=False)
    voucher_hash: Mapped[str | None] = mapped_column(Hash32())
    epoch_id: Mapped[int | None] = mapped_column(BigInteger)
    detail: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, default=utc_now)
    # the epoch that collected this receipt later, with its lane's next valid voucher (no longer lost)
    recovered_epoch_id: Mapped[int | None] = mapped_column(BigInteger)
