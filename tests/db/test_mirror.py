"""The mirror's writes: a large batch (PostgreSQL's COPY path) stores exactly what small batches do,
re-ingesting is a no-op, and a rollback rebuilds rows as if the rolled-back events never happened."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from node.chain.events import ChainEvent
from node.chain.mirror import Mirror
from node.db.models import Adapter, AdapterLineage, Dataset, RawEvent
from node.db.payment_models import ChannelAccount, EscrowAccount
from node.db.session import make_engine, session_factory, upgrade

NODE = "0x" + "bb" * 20


def _events(n: int) -> list[ChainEvent]:
    out = []
    for i in range(1, n + 1):
        block = 10 + i // 4
        payer = f"0x{i % 7 + 1:040x}"

        def ev(log: int, name: str, block: int = block, i: int = i, **args: Any) -> ChainEvent:
            return ChainEvent(31337, block, f"0x{block:064x}", f"0x{i:064x}", log, "0x" + "01" * 20,
                              name, args)
        out.append(ev(0, "DatasetRegistered", datasetId=i, owner=payer, contentHash=f"0x{i:064x}",
                      uri=f"ipfs://d{i}/é", payout=payer))
        out.append(ev(1, "Deposited", payer=payer, node=NODE, amount=10**24 + i))
        if i % 10 == 0:
            out.append(ev(2, "AdapterRegistered", adapterId=i // 10, owner=payer, baseModel=f"0x{1:064x}",
                          weightsSha256=f"0x{i:064x}", uri="file:///a", datasetIds=(i, i - 1),
                          weightsBps=(5_000, 5_000), ownerShareBps=100, lineageHash=f"0x{2:064x}"))
            out.append(ev(3, "ThawStarted", payer=payer, node=NODE, amount=i, thawEndAt=1_900_000_000 + i))
    return out


def _dump(factory: sessionmaker[Session]) -> dict[str, list[Any]]:
    with factory() as s:
        return {m.__tablename__: sorted(repr({c.name: getattr(r, c.name) for c in m.__table__.columns
                                               if c.name != "id"}) for r in s.scalars(select(m)))
                for m in (Dataset, Adapter, AdapterLineage, EscrowAccount, RawEvent)}


def _db(url: str) -> sessionmaker[Session]:
    upgrade(url)
    return session_factory(make_engine(url))


def test_one_big_batch_equals_many_small_ones_and_replays_are_no_ops(db_url: str, tmp_path: Any) -> None:
    events = _events(300)  # ~660 events: above the COPY threshold
    big, small, mirror = _db(db_url), _db(f"sqlite:///{tmp_path / 'small.db'}"), Mirror(31337)
    with big.begin() as s:
        assert mirror.ingest(s, events, final_block=40) == len(events)
    for i in range(0, len(events), 50):
        with small.begin() as s:
            mirror.ingest(s, events[i:i + 50], final_block=40)
    assert _dump(big) == _dump(small)
    with big.begin() as s:
        assert mirror.ingest(s, events, final_block=40) == 0
        assert mirror.ingest(s, events[-3:] + events[-3:], final_block=40) == 0
    assert _dump(big) == _dump(small)


def test_a_log_given_twice_in_one_batch_counts_once(db_url: str) -> None:
    factory, mirror = _db(db_url), Mirror(31337)
    deposit = [e for e in _events(3) if e.name == "Deposited"][:1]
    with factory.begin() as s:
        assert mirror.ingest(s, deposit * 3, final_block=0) == 1
    with factory() as s:
        assert s.scalars(select(EscrowAccount.balance)).one() == deposit[0].args["amount"]


def test_a_rollback_equals_never_having_seen_the_events(db_url: str, tmp_path: Any) -> None:
    events, fork = _events(300), 50
    rolled, fresh, mirror = _db(db_url), _db(f"sqlite:///{tmp_path / 'fresh.db'}"), Mirror(31337)
    with rolled.begin() as s:
        mirror.ingest(s, events, final_block=20)
    with rolled.begin() as s:
        removed = mirror.rollback(s, fork, final_block=20)
    with fresh.begin() as s:
        mirror.ingest(s, [e for e in events if e.block_number <= fork], final_block=20)
    assert removed == sum(e.block_number > fork for e in events)
    assert _dump(rolled) == _dump(fresh)


def test_the_outbox_follows_the_chain_to_final_and_back_on_a_reorg(db_url: str) -> None:
    from node.db.models import EpochState, SettlementEpoch

    factory, mirror = _db(db_url), Mirror(31337)
    settled = ChainEvent(31337, 30, f"0x{30:064x}", f"0x{99:064x}", 0, "0x" + "02" * 20, "EpochSettled",
                         {"node": NODE, "epochId": 1, "rewardsRoot": f"0x{5:064x}", "rewardsTotal": 10**20,
                          "receiptsRoot": f"0x{6:064x}", "receiptCount": 3, "collected": 10**20,
                          "unlockAt": 1_900_000_000})

    def state() -> EpochState:
        with factory() as s:
            return s.scalars(select(SettlementEpoch.state)).one()
    with factory.begin() as s:
        # the epoch the node sent, with the roots the chain's EpochSettled carries
        s.add(SettlementEpoch(node=NODE, epoch_id=1, state=EpochState.SUBMITTED, rewards_root=f"0x{5:064x}",
                              receipts_root=f"0x{6:064x}"))
    with factory.begin() as s:
        mirror.ingest(s, [settled], final_block=20)
    assert state() is EpochState.CONFIRMED
    with factory.begin() as s:
        mirror.rollback(s, 29, final_block=20)
    assert state() is EpochState.SUBMITTED
    with factory.begin() as s:
        mirror.ingest(s, [settled], final_block=20)
        mirror.finalize(s, 30)
    assert state() is EpochState.FINAL


def test_an_escrow_row_keeps_its_thaw_as_of_the_final_block_until_a_cancel_is_final(db_url: str) -> None:
    """`final_thawing` and its end: what a reorg above the final block could bring back of a thaw (the hold
    counts the larger of it and `thawing`, settlement the sooner end); a thaw started, a withdrawal or a final
    cancel leave nothing to bring back."""
    factory, mirror = _db(db_url), Mirror(31337)
    txs = iter(range(1, 100))
    payer = "0x" + "0c" * 20

    def ev(block: int, name: str, **args: int) -> ChainEvent:
        return ChainEvent(31337, block, f"0x{block:064x}", f"0x{next(txs):064x}", 0, "0x" + "01" * 20, name,
                          {"payer": payer, "node": NODE, **args})

    def thaw(block: int, amount: int) -> ChainEvent:  # ends at 1_900_000_000 + its block
        return ev(block, "ThawStarted", amount=amount, thawEndAt=1_900_000_000 + block if amount else 0)

    def ingest(final: int, *events: ChainEvent) -> tuple[int, int, int, int | None]:
        with factory.begin() as s:
            mirror.ingest(s, events, final_block=final)
            mirror.finalize(s, final)
        with factory() as s:
            row = s.get(EscrowAccount, (payer, NODE))
            assert row is not None
            end = row.final_thaw_end_at and int(row.final_thaw_end_at.timestamp()) - 1_900_000_000
            return row.balance, row.thawing, row.final_thawing, end

    assert ingest(2, ev(1, "Deposited", amount=1_000), thaw(2, 600)) == (1_000, 600, 600, 2)
    assert ingest(3, thaw(5, 0)) == (1_000, 0, 600, 2)  # cancelled in block 5, not final
    assert ingest(4) == (1_000, 0, 600, 2)
    with factory.begin() as s:
        mirror.rollback(s, to_block=4, final_block=4)  # the cancel is reorged out
    assert ingest(4) == (1_000, 600, 600, 2)
    assert ingest(4, thaw(5, 600)) == (1_000, 600, 600, 2)  # restarted (ends at 5), not final
    assert ingest(4, thaw(6, 0)) == (1_000, 0, 600, 2)
    assert ingest(6) == (1_000, 0, 0, None)  # the cancel is final
    assert ingest(6, thaw(7, 200)) == (1_000, 200, 0, None)  # a thaw started counts at once (`thawing`)
    assert ingest(7) == (1_000, 200, 200, 7)
    assert ingest(7, ev(8, "Withdrawn", amount=200)) == (800, 0, 0, None)  # withdrawn: nothing to bring back
    assert ingest(8, thaw(9, 300), thaw(10, 0)) == (800, 0, 0, None)
    assert ingest(9) == (800, 0, 300, 9)  # the thaw is final, its cancel is not
    assert ingest(10) == (800, 0, 0, None)


def test_a_channel_keeps_its_pending_withdrawal_as_of_the_final_block_until_a_lowering_is_final(db_url: str) -> None:
    """The same for an x402 channel: a withdrawal lowered above the final block, less what was refunded or
    withdrawn since."""
    factory, mirror = _db(db_url), Mirror(31337)
    txs = iter(range(1, 100))
    channel = f"0x{7:064x}"

    def ev(block: int, name: str, **args: Any) -> ChainEvent:
        return ChainEvent(31337, block, f"0x{block:064x}", f"0x{next(txs):064x}", 0, "0x" + "02" * 20, name,
                          {"channelId": channel, **args})

    def ingest(final: int, *events: ChainEvent) -> tuple[int, int, int]:
        with factory.begin() as s:
            mirror.ingest(s, events, final_block=final)
            mirror.finalize(s, final)
        with factory() as s:
            row = s.get(ChannelAccount, channel)
            assert row is not None
            return row.balance, row.pending_withdrawal, row.final_pending_withdrawal

    def withdraw(block: int, amount: int) -> ChainEvent:
        return ev(block, "ChannelWithdrawInitiated", amount=amount, readyAt=1_900_000_000)

    assert ingest(2, ev(1, "ChannelDeposited", payer="0x" + "0c" * 20, amount=1_000, balance=1_000),
                  withdraw(2, 500)) == (1_000, 500, 500)
    assert ingest(2, withdraw(3, 1)) == (1_000, 1, 500)  # lowered, not final
    assert ingest(2, ev(4, "ChannelRefunded", amount=300, nextNonce=1)) == (700, 0, 200)  # refunded: gone for good
    assert ingest(4) == (700, 0, 0)
