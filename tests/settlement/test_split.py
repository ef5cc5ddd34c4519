from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from node.settlement.split import BPS, Lineage, SplitParams, split_fee, split_receipts, split_shares

TREASURY, NODE, OWNER = "0xtreasury", "0xnode", "0xowner"
PARAMS = SplitParams(treasury=TREASURY, node=NODE, protocol_bps=100, node_bps=2_000)


def test_worked_example() -> None:
    lineage = Lineage(OWNER, 3_000, (("0xa", 5_000), ("0xb", 3_333), ("0xc", 1_667)))
    shares = split_fee(1_000_003, PARAMS, lineage)
    # protocol 10_000, node 200_000, rest 790_003, owner 237_000, pool 553_003
    assert shares[TREASURY] == 10_000
    assert shares[OWNER] == 237_000
    assert shares["0xa"] == 276_501
    assert shares["0xb"] == 553_003 * 3_333 // BPS == 184_315
    assert shares["0xc"] == 553_003 * 1_667 // BPS == 92_185
    assert shares[NODE] == 200_000 + (553_003 - 276_501 - 184_315 - 92_185)
    assert sum(shares.values()) == 1_000_003


def test_the_shares_by_role_name_each_part_of_the_worked_example() -> None:
    """What `loranode earnings` reports per source: one role per part, the dust with the node's share."""
    lineage = Lineage(OWNER, 3_000, (("0xa", 5_000), ("0xb", 3_333), ("0xc", 1_667)))
    shares = split_shares(1_000_003, PARAMS, lineage)
    assert [(s.role, s.payee, s.amount, s.position) for s in shares] == [
        ("treasury", TREASURY, 10_000, None), ("node", NODE, 200_000 + 2, None), ("owner", OWNER, 237_000, None),
        ("dataset", "0xa", 276_501, 0), ("dataset", "0xb", 184_315, 1), ("dataset", "0xc", 92_185, 2)]


def test_one_address_in_several_roles_adds_up() -> None:
    lineage = Lineage(NODE, 5_000, ((NODE, 10_000),))
    shares = split_fee(100, PARAMS, lineage)
    assert shares == {TREASURY: 1, NODE: 99}


def test_bad_weights_are_refused() -> None:
    with pytest.raises(ValueError, match="sum to 9999"):
        Lineage(OWNER, 0, (("0xa", 9_999),))
    with pytest.raises(ValueError, match="must be in"):
        SplitParams(TREASURY, NODE, 6_000, 5_000)


weights = st.lists(st.integers(min_value=0, max_value=BPS), min_size=1, max_size=6).map(
    lambda ws: [*ws[:-1], BPS - sum(ws[:-1])] if sum(ws[:-1]) <= BPS else [BPS])
lineages = st.builds(lambda share, ws: Lineage(OWNER, share, tuple((f"0xd{i}", w) for i, w in enumerate(ws))),
                     st.integers(0, BPS), weights)
params = st.builds(lambda p, n: SplitParams(TREASURY, NODE, p, n), st.integers(0, 5_000), st.integers(0, 5_000))


@given(fee=st.integers(0, 2**200), lineage=lineages, params=params)
def test_shares_sum_to_the_fee_and_are_never_negative(fee: int, lineage: Lineage, params: SplitParams) -> None:
    shares = split_fee(fee, params, lineage)
    assert sum(shares.values()) == fee
    assert all(v >= 0 for v in shares.values())


@given(fee=st.integers(0, 2**128), lineage=lineages, params=params)
def test_dust_is_bounded_by_the_number_of_datasets(fee: int, lineage: Lineage, params: SplitParams) -> None:
    shares = split_fee(fee, params, lineage)
    node_exact = fee * params.node_bps // BPS
    assert 0 <= shares[NODE] - node_exact <= len(lineage.datasets)


@given(fees=st.lists(st.integers(0, 10**24), max_size=50), lineage=lineages, params=params)
def test_an_epoch_pays_exactly_what_was_collected(fees: list[int], lineage: Lineage, params: SplitParams) -> None:
    total = split_receipts(((f, "ad1") for f in fees), {"ad1": lineage}, params)
    assert sum(total.values()) == sum(fees)
