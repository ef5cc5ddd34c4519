"""The blend rule: exact sums, lineage weights for no evidence, nothing outside the lineage."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from node.attribution.rule import BPS, CURRENT_RULE, rule_of
from node.errors import AttributionError


def _lineage(draw: st.DrawFn) -> list[int]:
    n = draw(st.integers(1, 8))
    cuts = sorted(draw(st.lists(st.integers(0, BPS), min_size=n - 1, max_size=n - 1)))
    return [b - a for a, b in zip([0, *cuts], [*cuts, BPS], strict=True)]


@st.composite
def lineage_and_scores(draw: st.DrawFn) -> tuple[list[int], list[int]]:
    lineage = _lineage(draw)
    return lineage, draw(st.lists(st.integers(0, 10**6), min_size=len(lineage), max_size=len(lineage)))


@given(lineage_and_scores())
def test_weights_sum_to_exactly_10000_and_follow_the_formula(case: tuple[list[int], list[int]]) -> None:
    lineage, scores = case
    weights = CURRENT_RULE.weights(lineage, scores)
    assert sum(weights) == BPS and all(w >= 0 for w in weights)
    total = sum(scores)
    if total == 0:
        assert weights == tuple(lineage)
        return
    exact = [(BPS - CURRENT_RULE.alpha_bps) * w / BPS + CURRENT_RULE.alpha_bps * s / total
             for w, s in zip(lineage, scores, strict=True)]
    for w, e in zip(weights, exact, strict=True):
        assert e - 1 < w < e + len(lineage)  # a floor, plus at most the remainder


def test_a_worked_example_from_the_docs() -> None:
    # lineage 50/30/20 %, all the evidence in the first dataset: half the weight follows the evidence
    assert CURRENT_RULE.weights([5_000, 3_000, 2_000], [40, 0, 0]) == (7_500, 1_500, 1_000)
    # floors leave 1 bps: it goes to the largest lineage weight (the first on a tie)
    assert CURRENT_RULE.weights([3_334, 3_333, 3_333], [1, 1, 1]) == (3_334, 3_333, 3_333)
    assert CURRENT_RULE.weights([5_000, 5_000], [1, 2]) == (4_167, 5_833)
    assert CURRENT_RULE.weights([10_000], [7]) == (10_000,)


def test_bad_lineages_and_unknown_versions_are_refused() -> None:
    with pytest.raises(AttributionError):
        CURRENT_RULE.weights([5_000, 4_000], [1, 1])
    with pytest.raises(AttributionError):
        CURRENT_RULE.weights([10_000], [1, 2])
    with pytest.raises(AttributionError, match="unknown attribution rule"):
        rule_of(99)
