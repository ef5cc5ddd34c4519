"""The epoch computation on plain values: lanes, cumulative rewards across epochs, exact totals."""

from __future__ import annotations

from eth_utils import to_checksum_address
from hypothesis import given, settings
from hypothesis import strategies as st

from node.protocol.receipt import LEAF_TYPES, Receipt, adapter_id_bytes
from node.protocol.voucher import SignedVoucher
from node.settlement.epoch_builder import (
    REWARD_LEAF_TYPES,
    EpochReceipt,
    build_epoch,
    collectible,
    cumulative_of,
    lane_charges,
)
from node.settlement.merkle import MerkleTree
from node.settlement.split import Lineage, SplitParams

TREASURY, NODE = "0x" + "11" * 20, "0x" + "22" * 20
OWNER, D1, D2 = "0x" + "33" * 20, "0x" + "44" * 20, "0x" + "55" * 20
PAYERS = ("0x" + "66" * 20, "0x" + "77" * 20)
PARAMS = SplitParams(TREASURY, NODE, 500, 1_500)
LINEAGES = {1: Lineage(OWNER, 2_000, ((D1, 6_000), (D2, 4_000))), 2: Lineage(D1, 0, ())}


def _signed(n: int, adapter: int, fee: int) -> Receipt:
    return Receipt(n.to_bytes(32, "big"), adapter_id_bytes(adapter), 7, b"\xee" * 32, 3, 4, fee, b"\xff" * 32, 1)


def receipt(n: int, payer: int, lane: int, fee: int, cumulative: int, adapter: int = 1) -> EpochReceipt:
    voucher = SignedVoucher(PAYERS[payer], NODE, lane, cumulative, b"\xab" * 32, 4_000_000_000, b"\xcd" * 65)
    return EpochReceipt(n, _signed(n, adapter, fee), voucher)


def test_each_lane_collects_its_fees_with_its_highest_voucher() -> None:
    rs = [receipt(1, 0, 0, 100, 150), receipt(2, 0, 0, 40, 190), receipt(3, 0, 1, 7, 7), receipt(4, 1, 0, 0, 5),
          receipt(5, 1, 0, 9, 30)]
    lanes = {(c.payer, c.lane): (c.amount, c.voucher.cumulative) for c in lane_charges(rs)}
    assert lanes == {(PAYERS[0], 0): (140, 190), (PAYERS[0], 1): (7, 7), (PAYERS[1], 0): (9, 30)}


def paid(n: int, lane: int, fee: int, charged_total: int, cumulative: int, deadline: int) -> EpochReceipt:
    voucher = SignedVoucher(PAYERS[0], NODE, lane, cumulative, b"\xab" * 32, deadline, b"\xcd" * 65)
    return EpochReceipt(n, _signed(n, 1, fee), voucher, charged_total=charged_total)


def test_a_lane_collects_what_its_best_voucher_still_valid_covers() -> None:
    rs = [paid(1, 0, 100, 100, 1_000, deadline=500),  # a budget: it covers up to 1,000
          paid(2, 0, 300, 400, 1_050, deadline=90),  # higher but expired; covered by the first
          paid(3, 0, 700, 1_100, 1_200, deadline=90),  # beyond every valid voucher: lost
          paid(4, 1, 5, 5, 5, deadline=99)]  # a lane with no voucher valid at 100: lost
    covered, lost = collectible(rs, valid_until=100)
    assert [r.receipt_id for r in covered] == [1, 2] and [r.receipt_id for r in lost] == [3, 4]
    build = build_epoch(covered, LINEAGES, PARAMS, {}, 0, valid_until=100)
    assert [(c.amount, c.voucher.cumulative) for c in build.lanes] == [(400, 1_000)]  # the valid voucher
    assert build.collected == build.rewards_total == sum(build.cumulative.values()) == 400


def test_two_epochs_give_cumulative_leaves_and_totals() -> None:
    first = build_epoch([receipt(1, 0, 0, 1_000_003, 1_000_003), receipt(2, 1, 0, 77, 100, adapter=2)],
                        LINEAGES, PARAMS, {}, 0)
    assert first.collected == first.rewards_total == 1_000_080
    assert sum(first.cumulative.values()) == first.rewards_total
    previous = cumulative_of(first.rewards.to_json())
    assert previous == {a: v for a, v in first.cumulative.items() if v}
    second = build_epoch([receipt(3, 0, 0, 500, 2_000_000)], LINEAGES, PARAMS, previous, first.rewards_total)
    assert second.collected == 500 and second.rewards_total == 1_000_580
    assert sum(second.cumulative.values()) == 1_000_580
    assert all(second.cumulative[a] >= v for a, v in first.cumulative.items())  # cumulative never shrinks
    leaves = dict(second.rewards.values)
    assert leaves == second.cumulative
    assert second.receipt_count == 1 and second.receipts.types == LEAF_TYPES
    i = 0
    assert MerkleTree.verify(second.rewards.root, REWARD_LEAF_TYPES, second.rewards.values[i], second.rewards.proof(i))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 2), st.integers(0, 10**24), st.integers(1, 2)),
                min_size=1, max_size=25))
def test_rewards_total_equals_collected_and_leaves_add_up(items: list[tuple[int, int, int, int]]) -> None:
    charged: dict[tuple[int, int], int] = {}
    rs = []
    for n, (payer, lane, fee, adapter) in enumerate(items):
        charged[(payer, lane)] = charged.get((payer, lane), 0) + fee
        rs.append(receipt(n, payer, lane, fee, charged[(payer, lane)], adapter))
    build = build_epoch(rs, LINEAGES, PARAMS, {}, 0)
    assert build.collected == sum(fee for _, _, fee, _ in items) == build.rewards_total
    assert sum(v for _, v in build.rewards.values) == build.rewards_total
    for c in build.lanes:  # the voucher always covers what the lane collects
        assert c.voucher.cumulative >= c.amount > 0


def test_a_build_on_any_stored_tree_keeps_one_leaf_per_payee() -> None:
    """`build_epoch` no longer checksums the previous amounts: `cumulative_of` gives them checksummed,
    whatever case the stored tree wrote (ours, or a guardian's corrected tree in lower case), so a payee
    of the new epoch adds to its old leaf instead of getting a second one."""
    first = build_epoch([receipt(1, 0, 0, 1_000, 1_000)], LINEAGES, PARAMS, {}, 0)
    lower = MerkleTree.of([[a.lower(), v] for a, v in first.cumulative.items()], REWARD_LEAF_TYPES)
    for stored in (first.rewards, lower):
        previous = cumulative_of(stored.to_json())
        assert all(a == to_checksum_address(a) for a in previous)
        second = build_epoch([receipt(2, 0, 0, 500, 1_500)], LINEAGES, PARAMS, previous, first.rewards_total)
        accounts = [a for a, _ in second.rewards.values]
        assert len({a.lower() for a in accounts}) == len(accounts) == len(first.cumulative)
        assert sum(v for _, v in second.rewards.values) == second.rewards_total == 1_500
        assert all(second.cumulative[a] > v for a, v in previous.items())  # every payee of lineage 1 earned again
