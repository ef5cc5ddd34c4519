"""Which lanes an epoch takes when a payer may withdraw before the settle lands (`outbox.at_risk_first`):
that payer's lanes alone, when they pay for a settle of their own; never mixed with others' lanes."""

from __future__ import annotations

from node.settlement.outbox import at_risk_first

LANDS = 1_000  # when the settle lands (chain time)
THAW_ENDS = {"a": 900, "b": 2_000}  # a may withdraw before it lands, b only after; c is not thawing


def lanes(*rows: tuple[str, int, int]) -> list[tuple[str, int, int, int, int]]:
    """(payer, lane, deadline, first receipt id, fee), most urgent first."""
    return [(payer, lane, 5_000, i, fee) for i, (payer, lane, fee) in enumerate(rows)]


def test_the_most_urgent_payer_that_may_withdraw_is_settled_alone() -> None:
    urgent = lanes(("a", 0, 100), ("a", 1, 100), ("b", 0, 100), ("c", 0, 100))
    assert [(p, n) for p, n, *_ in at_risk_first(urgent, THAW_ENDS, LANDS)] == [("a", 0), ("a", 1)]


def test_a_payer_that_may_withdraw_never_joins_a_batch_of_others() -> None:
    urgent = lanes(("c", 0, 100), ("a", 0, 100), ("b", 0, 100))
    assert [p for p, *_ in at_risk_first(urgent, THAW_ENDS, LANDS)] == ["c", "b"]


def test_a_payer_that_may_withdraw_waits_when_its_lanes_do_not_pay_for_a_settle_of_their_own() -> None:
    urgent = lanes(("a", 0, 100), ("a", 1, 100), ("c", 0, 100))
    assert [p for p, *_ in at_risk_first(urgent, THAW_ENDS, LANDS, lambda n: 140 + 30 * n)] == ["a", "a"]  # 200 >= 200
    assert [p for p, *_ in at_risk_first(urgent, THAW_ENDS, LANDS, lambda n: 150 + 30 * n)] == ["c"]  # 200 < 210
