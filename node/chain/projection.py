"""How each event changes the mirror row it belongs to: pure functions, no database.

An event belongs to one entity (`entity_of`), e.g. `escrow:<payer>:<node>`. A row is a dict of the
mirror table's columns. Replaying an entity's events from `None` in chain order gives its row: the
indexer applies new events to the stored row, a rollback replays what is left after the fork.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from node.chain.events import ChainEvent
from node.errors import ChainError

Row = dict[str, Any]
KINDS = ("dataset", "adapter", "escrow", "lane", "epoch", "claim", "channel")  # parents before children
CREATING = frozenset({"DatasetRegistered", "AdapterRegistered", "EpochSettled", "Claimed"})


def entity_of(ev: ChainEvent) -> str:
    a = ev.args
    match ev.name:
        case "DatasetRegistered" | "DatasetUpdated":
            return f"dataset:{a['datasetId']}"
        case "AdapterRegistered" | "AdapterDeprecated":
            return f"adapter:{a['adapterId']}"
        case "Deposited" | "ThawStarted" | "Withdrawn" | "Collected":
            return f"escrow:{a['payer']}:{a['node']}"
        case "VoucherCollected":
            return f"lane:{a['payer']}:{a['node']}:{a['lane']}"
        case "EpochSettled" | "EpochVetoed" | "EpochAmended":
            return f"epoch:{a['node']}:{a['epochId']}"
        case "Claimed":
            return f"claim:{a['node']}:{a['account']}:{a['epochId']}"
        case name if name.startswith("Channel"):
            return f"channel:{a['channelId']}"
    raise ChainError("event has no mirror entity", event=ev.name)


def kind_of(entity: str) -> str:
    return entity.split(":", 1)[0]


def _created(ev: ChainEvent, **cols: Any) -> Row:
    return {**cols, "block_number": ev.block_number, "updated_block": ev.block_number}


def _changed(row: Row | None, ev: ChainEvent, **cols: Any) -> Row:
    if row is None:
        raise ChainError("event changes a row the mirror does not have", event=ev.name, tx_hash=ev.tx_hash,
                         block=ev.block_number, entity=entity_of(ev))
    return {**row, **cols, "updated_block": ev.block_number}


def _time(seconds: int) -> datetime | None:
    return datetime.fromtimestamp(seconds, UTC) if seconds else None


def _escrow(row: Row | None, ev: ChainEvent) -> Row:
    a = ev.args
    if row is None:
        row = _created(ev, payer=a["payer"], node=a["node"], balance=0, thawing=0, thaw_end_at=None,
                       deposited=0, withdrawn=0, collected=0)
    amount = a["amount"]
    match ev.name:
        case "Deposited":
            return _changed(row, ev, balance=row["balance"] + amount, deposited=row["deposited"] + amount)
        case "ThawStarted":
            return _changed(row, ev, thawing=amount, thaw_end_at=_time(a["thawEndAt"]))
        case "Withdrawn":
            return _changed(row, ev, balance=row["balance"] - amount, withdrawn=row["withdrawn"] + amount,
                            thawing=0, thaw_end_at=None)
        case "Collected":
            balance = row["balance"] - amount
            return _changed(row, ev, balance=balance, collected=row["collected"] + amount,
                            thawing=min(row["thawing"], balance))
    raise ChainError("not an escrow event", event=ev.name)


def _channel(row: Row | None, ev: ChainEvent) -> Row | None:
    """An x402 channel: the contract's accounting, event by event (contracts/src/X402Channels.sol). The
    mirror follows every channel of the contract from the first deposit it sees; a channel funded before
    the mirror's first block (only another receiver's can be) is exact from there on in `balance`
    (absolute in `Deposited`) and from its next `Claimed` in `total_claimed`."""
    a = ev.args
    if row is None:
        if ev.name not in ("ChannelCreated", "ChannelDeposited"):
            return None  # a channel funded before the mirror's first block (another receiver's): not followed
        payer = a["config"][0] if ev.name == "ChannelCreated" else a["payer"]
        row = _created(ev, channel_id=a["channelId"], payer=payer, receiver=None, balance=0, total_claimed=0,
                       deposited=0, refunded=0, withdrawn=0, pending_withdrawal=0, withdraw_ready_at=None,
                       refund_nonce=0)
    match ev.name:
        case "ChannelCreated":  # again after a channel emptied without a claim: same config
            return _changed(row, ev, receiver=a["config"][2])
        case "ChannelDeposited":
            return _changed(row, ev, balance=a["balance"], deposited=row["deposited"] + a["amount"])
        case "ChannelClaimed":
            return _changed(row, ev, total_claimed=a["totalClaimed"], receiver=a["receiver"])
        case "ChannelRefunded":
            pending = row["pending_withdrawal"] - a["amount"] if row["pending_withdrawal"] > a["amount"] else 0
            return _changed(row, ev, balance=row["balance"] - a["amount"], refunded=row["refunded"] + a["amount"],
                            refund_nonce=a["nextNonce"], **_withdrawal(row, pending))
        case "ChannelWithdrawInitiated":
            return _changed(row, ev, pending_withdrawal=a["amount"], withdraw_ready_at=_time(a["readyAt"]))
        case "ChannelWithdrawn":
            return _changed(row, ev, balance=row["balance"] - a["amount"], withdrawn=row["withdrawn"] + a["amount"],
                            **_withdrawal(row, 0))
    raise ChainError("not a channel event", event=ev.name)


def _withdrawal(row: Row, pending: int) -> Row:
    if pending:
        return {"pending_withdrawal": pending}
    return {"pending_withdrawal": 0, "withdraw_ready_at": None}


def apply(row: Row | None, ev: ChainEvent) -> Row | None:
    """The row after `ev`, given the row before it (None if the entity has no row yet, or none to keep)."""
    a = ev.args
    if ev.name.startswith("Channel"):
        return _channel(row, ev)
    match ev.name:
        case "DatasetRegistered":
            return _created(ev, dataset_id=a["datasetId"], owner=a["owner"], content_hash=a["contentHash"],
                            uri=a["uri"], payout=a["payout"], tx_hash=ev.tx_hash)
        case "DatasetUpdated":
            return _changed(row, ev, uri=a["uri"], payout=a["payout"])
        case "AdapterRegistered":
            lineage = list(zip(a["datasetIds"], a["weightsBps"], strict=True))
            return _created(ev, adapter_id=a["adapterId"], owner=a["owner"], base_model=a["baseModel"],
                            weights_sha256=a["weightsSha256"], uri=a["uri"],
                            owner_share_bps=a["ownerShareBps"],
                            lineage_hash=a["lineageHash"], deprecated_block=None, tx_hash=ev.tx_hash,
                            _lineage=lineage)
        case "AdapterDeprecated":
            return _changed(row, ev, deprecated_block=ev.block_number)
        case "VoucherCollected":
            base = row or _created(ev, payer=a["payer"], node=a["node"], lane=a["lane"], collected=0,
                                   last_cumulative=0)
            return _changed(base, ev, collected=base["collected"] + a["amount"],
                            last_cumulative=max(base["last_cumulative"], a["cumulative"]))
        case "EpochSettled":
            return _created(ev, node=a["node"], epoch_id=a["epochId"], rewards_root=a["rewardsRoot"],
                            rewards_total=a["rewardsTotal"], receipts_root=a["receiptsRoot"],
                            receipt_count=a["receiptCount"], collected=a["collected"],
                            unlock_at=_time(a["unlockAt"]) or datetime.fromtimestamp(0, UTC),
                            tx_hash=ev.tx_hash, vetoed_block=None)
        case "EpochVetoed":
            return _changed(row, ev, vetoed_block=ev.block_number)
        case "EpochAmended":  # the guardian's corrected roots replace the vetoed epoch's
            return _changed(row, ev, rewards_root=a["rewardsRoot"], rewards_total=a["rewardsTotal"],
                            receipts_root=a["receiptsRoot"], receipt_count=a["receiptCount"],
                            unlock_at=_time(a["unlockAt"]), vetoed_block=None)
        case "Claimed":
            return _created(ev, node=a["node"], account=a["account"], epoch_id=a["epochId"],
                            amount=a["amount"], cumulative_amount=a["cumulativeAmount"], tx_hash=ev.tx_hash)
    return _escrow(row, ev)


def replay(row: Row | None, events: Iterable[ChainEvent]) -> Row | None:
    for ev in events:
        row = apply(row, ev)
    return row

