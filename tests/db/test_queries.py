"""The shared reads: spendable escrow (final deposits only), lineage at a block, lanes, epoch receipts."""

from __future__ import annotations

from typing import Any

from sqlalchemy import event, insert, text
from sqlalchemy.orm import Session, sessionmaker

from node.chain.events import ChainEvent
from node.chain.mirror import Mirror
from node.db import queries
from node.db.loss import LossReason, LossRecord, record_loss
from node.db.models import Lane, Loss, Receipt, SettlementEpoch, Voucher
from node.db.queries import Escrow, adapter_lineage, epoch_receipts, payer_lanes, spendable_escrow
from node.db.session import make_engine, session_factory, upgrade
from node.settlement.epoch_report import losses_of
from tests.payment.test_hold_many_lanes import LANES, TABLES, _payer_with_many_lanes
from tests.payment.test_hold_many_lanes import NODE as MANY_NODE
from tests.payment.test_hold_many_lanes import PAYER as MANY_PAYER

PAYER, NODE, OTHER = "0x" + "aA" * 20, "0x" + "bb" * 20, "0x" + "cc" * 20
H = "0x" + "ee" * 32
ETH = 10**18


def _ev(block: int, name: str, **args: Any) -> ChainEvent:
    return ChainEvent(31337, block, f"0x{block:064x}", f"0x{block * 1000 + len(args):064x}", 0,
                      "0x" + "01" * 20, name, args)


def _db(db_url: str) -> sessionmaker[Session]:
    upgrade(db_url)
    return session_factory(make_engine(db_url))


def test_spendable_escrow_subtracts_thawing_and_uncollected_charges(db_url: str) -> None:
    factory, mirror = _db(db_url), Mirror(31337)
    payer = PAYER.lower()
    with factory.begin() as s:
        mirror.ingest(s, [_ev(1, "Deposited", payer=payer, node=NODE, amount=10 * ETH),
                          _ev(2, "ThawStarted", payer=payer, node=NODE, amount=3 * ETH,
                              thawEndAt=2_000_000_000),
                          _ev(3, "Deposited", payer=payer, node=OTHER, amount=99 * ETH)], final_block=3)
        s.add_all([Lane(payer=payer, node=NODE, lane=0, charged_total=2 * ETH, last_cumulative=2 * ETH),
                   Lane(payer=payer, node=NODE, lane=1, charged_total=ETH, last_cumulative=ETH)])
    with factory() as s:
        assert spendable_escrow(s, PAYER, NODE) == 10 * ETH - 3 * ETH - 3 * ETH
    # the chain collects lane 0 (2 ETH): balance and uncollected both drop, spendable is unchanged
    with factory.begin() as s:
        mirror.ingest(s, [_ev(4, "VoucherCollected", node=NODE, payer=payer, lane=0, cumulative=2 * ETH,
                              amount=2 * ETH),
                          _ev(5, "Collected", payer=payer, node=NODE, amount=2 * ETH)], final_block=3)
    with factory() as s:
        assert spendable_escrow(s, PAYER, NODE) == 4 * ETH
        lanes = payer_lanes(s, PAYER, NODE)
        assert [(la.lane, la.collected, la.uncollected) for la in lanes] == [(0, 2 * ETH, 0), (1, 0, ETH)]
        assert {la.node for la in payer_lanes(s, PAYER)} == {NODE}
        assert spendable_escrow(s, OTHER, NODE) == 0


def test_uncollected_is_each_lane_s_charge_less_its_collection_and_write_off_never_below_zero(db_url: str) -> None:
    factory, mirror = _db(db_url), Mirror(31337)
    payer = PAYER.lower()
    with factory.begin() as s:
        s.add_all([Lane(payer=payer, node=NODE, lane=lane, charged_total=5 * ETH, last_cumulative=5 * ETH)
                   for lane in range(4)] + [Lane(payer=payer, node=OTHER, lane=0, charged_total=ETH)])
        mirror.ingest(s, [_ev(1, "VoucherCollected", node=NODE, payer=payer, lane=1, cumulative=2 * ETH,
                              amount=2 * ETH),
                          _ev(2, "VoucherCollected", node=NODE, payer=payer, lane=2, cumulative=4 * ETH,
                              amount=4 * ETH)], final_block=2)
        for lane, amount, reason, epoch in ((2, 3 * ETH, LossReason.SETTLE_REFUSED, 1),  # written off: below 0
                                            (3, ETH, LossReason.LINEAGE_MISMATCH, 1),  # written off
                                            (3, ETH, LossReason.ESCROW_SHORT, 1),  # still owed
                                            (0, ETH, LossReason.SETTLE_REFUSED, None)):  # the API's: still owed
            record_loss(s, LossRecord(NODE, payer, lane, amount, reason, epoch_id=epoch))
    with factory() as s:
        expected = 5 * ETH + 3 * ETH + 0 + 4 * ETH
        assert queries.uncollected(s, PAYER, NODE) == expected
        assert sum(lane.uncollected for lane in payer_lanes(s, PAYER, NODE)) == expected
        assert queries.uncollected(s, OTHER, NODE) == 0


def test_deposits_are_spendable_only_once_final_and_debits_count_at_once(db_url: str) -> None:
    factory, mirror = _db(db_url), Mirror(31337, finality_depth=10)
    payer = PAYER.lower()

    def escrow() -> Escrow:
        with factory() as s:
            return queries.escrow(s, PAYER, NODE)
    with factory.begin() as s:
        mirror.ingest(s, [_ev(1, "Deposited", payer=payer, node=NODE, amount=10 * ETH)], final_block=1)
        mirror.ingest(s, [_ev(4, "Deposited", payer=payer, node=NODE, amount=5 * ETH),
                          _ev(6, "Deposited", payer=payer, node=NODE, amount=2 * ETH),
                          _ev(7, "Withdrawn", payer=payer, node=NODE, amount=ETH)], final_block=1)
    acct = escrow()
    assert (acct.balance, acct.pending_deposits, acct.pending_until_block) == (16 * ETH, 7 * ETH, 16)
    assert acct.spendable == 9 * ETH  # the final 10, less the withdrawal the mirror has seen
    with factory.begin() as s:
        mirror.finalize(s, 4)
    assert (escrow().pending_deposits, escrow().pending_until_block, escrow().spendable) == (2 * ETH, 16, 14 * ETH)
    with factory.begin() as s:
        mirror.rollback(s, 5, final_block=4)  # the deposit at block 6 and the withdrawal are gone
    assert (escrow().balance, escrow().pending_deposits, escrow().pending_until_block) == (15 * ETH, 0, None)
    with factory.begin() as s:
        mirror.ingest(s, [_ev(8, "Deposited", payer=payer, node=NODE, amount=ETH)], final_block=4)
        mirror.finalize(s, 8)
    acct = escrow()
    assert (acct.spendable, acct.pending_deposits, acct.pending_until_block, acct.is_final) == (16 * ETH, 0, None, True)


def test_adapter_lineage_is_as_registered_at_the_block(db_url: str) -> None:
    factory, mirror = _db(db_url), Mirror(31337)
    with factory.begin() as s:
        mirror.ingest(s, [
            _ev(1, "DatasetRegistered", datasetId=1, owner=OTHER, contentHash=H, uri="a", payout=OTHER),
            _ev(2, "DatasetRegistered", datasetId=2, owner=NODE, contentHash=H, uri="b", payout=NODE),
            _ev(3, "AdapterRegistered", adapterId=7, owner=PAYER.lower(), baseModel=H, weightsSha256=H,
                uri="file:///a", datasetIds=(2, 1), weightsBps=(2500, 7500), ownerShareBps=1000,
                lineageHash=H),
            _ev(6, "AdapterDeprecated", adapterId=7)], final_block=3)
    with factory() as s:
        assert adapter_lineage(s, 7, at_block=2) is None
        at4 = adapter_lineage(s, 7, at_block=4)
        assert at4 is not None and not at4.is_deprecated and at4.registered_block == 3
        got = [(d.dataset_id, d.weight_bps, d.payout) for d in at4.datasets]
        assert got == [(2, 2500, NODE), (1, 7500, OTHER)]
        head = adapter_lineage(s, 7)
        assert head is not None and head.is_deprecated and not head.is_final
        assert adapter_lineage(s, 8) is None


def test_epoch_receipts_are_the_epochs_own_in_write_order(db_url: str) -> None:
    factory = _db(db_url)
    with factory.begin() as s:
        s.add(SettlementEpoch(node=NODE, epoch_id=1))
        s.flush()
        for i, epoch in enumerate([1, None, 1]):
            vh = f"0x{i + 1:064x}"
            s.add(Voucher(voucher_hash=vh, payer=PAYER, node=NODE, lane=0, cumulative=i, request_hash=H,
                          deadline=0, signature="0x" + "00" * 65, charged_total=i))
            s.flush()
            s.add(Receipt(receipt_hash=f"0x{i + 100:064x}", voucher_hash=vh, node=NODE, adapter_id=7,
                          registry_block=3, lineage_hash=H, prompt_tokens=5, completion_tokens=9,
                          fee=10**20 + i, output_hash=H, method=1, signature="0x" + "00" * 65,
                          epoch_id=epoch))
            s.flush()
    with factory() as s:
        got = epoch_receipts(s, NODE.upper().replace("0X", "0x"), 1)
    assert [r.fee for r in got] == [10**20, 10**20 + 2]
    assert all(r.epoch_id == 1 and r.created_at.tzinfo is not None for r in got)


def test_an_epoch_s_losses_are_read_by_index_on_postgresql(postgres_url: str) -> None:
    """epoch_report.losses_of (the free GET /v1/epochs/{node}/{id}) reads one epoch's losses and the losses it
    recovered by the (node, epoch_id) and (node, recovered_epoch_id) indexes, not by scanning the node's."""
    factory = _db(postgres_url)
    statements: list[tuple[str, Any]] = []

    def seen(conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool) -> None:
        statements.append((statement, params))
    with factory.begin() as s:
        s.execute(insert(Loss), [{"node": NODE, "payer": PAYER.lower(), "lane": i % 50, "amount": 1,
                                  "epoch_id": i // 50, "reason": LossReason.ESCROW_SHORT.value,
                                  "recovered_epoch_id": i // 50 + 1} for i in range(20_000)])
        s.execute(text("ANALYZE losses"))
    with factory() as s:
        engine = s.get_bind()
        event.listen(engine, "before_cursor_execute", seen)
        report = losses_of(s, NODE, 7)
        event.remove(engine, "before_cursor_execute", seen)
        assert report["byReason"][0]["count"] == 50 and report["recoveredHere"]["count"] == 50
        plans = ["\n".join(s.connection().exec_driver_sql("EXPLAIN " + statement, params).scalars())
                 for statement, params in statements]
    assert len(plans) == 2
    assert "ix_losses_node_epoch_id" in plans[0] and "ix_losses_node_recovered_epoch_id" in plans[1], plans


def test_a_payers_uncollected_total_reads_its_lanes_by_key_on_unanalyzed_tables(postgres_url: str) -> None:
    """queries.uncollected (the free GET /v1/channels) on a payer with many lanes and tables with no statistics
    yet: each lane, its collection and its write-offs read once (it read the node's losses once per lane, by
    the (node, recovered_epoch_id) index, when the write-off's conditions were in the WHERE)."""
    factory = _db(postgres_url)
    _payer_with_many_lanes(postgres_url.replace("postgresql+psycopg://", "postgresql://", 1))
    with factory() as s:
        assert queries.uncollected(s, MANY_PAYER, MANY_NODE) == 40 * LANES
        read = s.execute(text("SELECT sum(coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0)) "
                              "FROM pg_stat_xact_user_tables WHERE relname = ANY(:tables)"),
                         {"tables": list(TABLES)}).scalar_one()
    assert read <= 4 * LANES, read
