"""The attribution rule (versioned): how span evidence becomes the dataset weights a receipt commits to.

Methods (a receipt's `method` field):
    1  lineage: the adapter's registered weights
    2  evidence: the registered weights blended with the evidence of this one output (`Rule.weights`)

Rule version 1 (docs/attribution.md):
    spans    for each dataset of the lineage, walk the output's tokens left to right; at position i take
             the longest prefix of output[i:] found in the dataset; if it has at least `min_span` (8)
             tokens it is a span and the walk goes on after it, else it goes on at i + 1
    score    a dataset's score is the number of output tokens its spans cover
    weights  with total score S > 0 and lineage weight L_d (bps), a = alpha_bps (5,000):
                 w_d = floor(((10,000 - a) * L_d * S + a * 10,000 * score_d) / (10,000 * S))
             and what the floors leave (fewer bps than there are datasets) goes to the dataset with the
             largest lineage weight (the first one on a tie); so the weights sum to exactly 10,000.
             S = 0 (the output matches no dataset): w = L exactly.
Only datasets of the lineage are ever scored, so a dataset outside it never gets anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from node.errors import AttributionError

METHOD_LINEAGE = 1
METHOD_EVIDENCE = 2
BPS = 10_000


@dataclass(frozen=True)
class Rule:
    version: int
    min_span: int  # tokens: shorter matches are no evidence
    alpha_bps: int  # the part of the weight that follows the evidence

    def weights(self, lineage_bps: Sequence[int], scores: Sequence[int]) -> tuple[int, ...]:
        """The blended weights (bps, summing to 10,000) for these lineage weights and scores."""
        if len(lineage_bps) != len(scores) or not lineage_bps or sum(lineage_bps) != BPS:
            raise AttributionError("lineage weights must be one per dataset and sum to 10,000",
                                   lineage_bps=list(lineage_bps), scores=list(scores))
        total = sum(scores)
        if total == 0:
            return tuple(lineage_bps)
        a = self.alpha_bps
        blended = [((BPS - a) * w * total + a * BPS * s) // (BPS * total) for w, s in zip(lineage_bps, scores,
                                                                                          strict=True)]
        largest = max(range(len(lineage_bps)), key=lambda i: (lineage_bps[i], -i))
        blended[largest] += BPS - sum(blended)
        return tuple(blended)


RULES: dict[int, Rule] = {1: Rule(version=1, min_span=8, alpha_bps=5_000)}
CURRENT_RULE = RULES[1]


def rule_of(version: int) -> Rule:
    rule = RULES.get(version)
    if rule is None:
        raise AttributionError(f"unknown attribution rule version {version}", known=sorted(RULES))
    return rule
