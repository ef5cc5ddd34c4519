"""Evidence for one output: which spans of it each dataset of the lineage contains, and the weights the
rule gives (rule.py). A pure function of the output text, the datasets' indexes and the tokenizer, so
the node and a verifier compute the same thing.

`Attribution.to_json()` is what a receipt row stores and `GET /v1/receipts/{id}` shows its payer (to
anyone else without the spans' `text`, which is output text):
    {"rule": 1, "minSpan": 8, "alphaBps": 5000, "tokenizer": "0x..", "outputTokens": 37,
     "datasetIds": [..], "lineageBps": [..], "weightsBps": [..],
     "evidence": [{"datasetId": 7, "score": 21, "spans": [{"start": 3, "end": 24, "count": 2, "text": ".."}]}]}
Span offsets are token positions in the output as the rule tokenizes it (token_rule.output_ids).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from node.attribution.rule import Rule, rule_of
from node.attribution.span_index import SpanIndex
from node.attribution.token_rule import Tokenizer, output_ids
from node.chain.contracts import lineage_hash
from node.errors import AttributionError


@dataclass(frozen=True)
class Span:
    start: int  # token offsets in the output, end exclusive
    end: int
    count: int  # occurrences of the span in the dataset
    text: str


@dataclass(frozen=True)
class DatasetEvidence:
    dataset_id: int
    spans: tuple[Span, ...]

    @property
    def score(self) -> int:
        """Output tokens covered by the dataset's spans."""
        return sum(s.end - s.start for s in self.spans)


@dataclass(frozen=True)
class Attribution:
    rule: Rule
    tokenizer: str
    num_output_tokens: int
    dataset_ids: tuple[int, ...]
    lineage_bps: tuple[int, ...]
    weights_bps: tuple[int, ...]
    evidence: tuple[DatasetEvidence, ...]

    @property
    def lineage_hash(self) -> bytes:
        """What the receipt's lineageHash commits to: abi.encode(datasetIds, weightsBps), as the registry."""
        return lineage_hash(self.dataset_ids, self.weights_bps)

    def to_json(self) -> dict[str, Any]:
        return {"rule": self.rule.version, "minSpan": self.rule.min_span, "alphaBps": self.rule.alpha_bps,
                "tokenizer": self.tokenizer, "outputTokens": self.num_output_tokens,
                "datasetIds": list(self.dataset_ids), "lineageBps": list(self.lineage_bps),
                "weightsBps": list(self.weights_bps),
                "evidence": [{"datasetId": e.dataset_id, "score": e.score,
                              "spans": [{"start": s.start, "end": s.end, "count": s.count, "text": s.text}
                                        for s in e.spans]} for e in self.evidence]}


def greedy_spans(lengths: np.ndarray, min_span: int) -> list[tuple[int, int]]:
    """(start, end) of the spans the rule takes, given the longest match length at every position."""
    spans, i, n = [], 0, int(lengths.shape[0])
    while i < n:
        length = int(lengths[i])
        if length >= min_span:
            spans.append((i, i + length))
            i += length
        else:
            i += 1
    return spans


def dataset_spans(index: SpanIndex, ids: np.ndarray, rule: Rule, tokenizer: Tokenizer) -> tuple[Span, ...]:
    picks = greedy_spans(index.longest_matches(ids), rule.min_span)
    if not picks:
        return ()
    starts = np.array([s for s, _ in picks], dtype=np.int64)
    ends = np.array([e for _, e in picks], dtype=np.int64)
    counts = index.counts(ids, starts, ends - starts)
    return tuple(Span(int(s), int(e), int(c), str(tokenizer.decode([int(t) for t in ids[s:e]])))
                 for s, e, c in zip(starts, ends, counts, strict=True))


def attribute(text: str, dataset_ids: Sequence[int], lineage_bps: Sequence[int],
              indexes: Mapping[int, SpanIndex], tokenizer: Tokenizer, tokenizer_id: str, rule: Rule) -> Attribution:
    """The evidence of `text` in each dataset of the lineage and the weights the rule gives."""
    ids = np.asarray(output_ids(tokenizer, text), dtype=np.int64)
    found: dict[int, tuple[Span, ...]] = {}
    for dataset_id in dataset_ids:  # a dataset listed twice is searched once
        if dataset_id not in found:
            found[dataset_id] = dataset_spans(indexes[dataset_id], ids, rule, tokenizer)
    evidence = tuple(DatasetEvidence(d, found[d]) for d in dataset_ids)
    weights = rule.weights(lineage_bps, [e.score for e in evidence])
    return Attribution(rule, tokenizer_id, int(ids.shape[0]), tuple(dataset_ids), tuple(lineage_bps), weights,
                       evidence)


@dataclass(frozen=True)
class StatedWeights:
    """What a stored attribution states: enough to settle (or check) a receipt."""

    rule: int
    tokenizer: str
    dataset_ids: tuple[int, ...]
    lineage_bps: tuple[int, ...]
    weights_bps: tuple[int, ...]

    @property
    def lineage_hash(self) -> bytes:
        return lineage_hash(self.dataset_ids, self.weights_bps)


def stated_weights(data: Mapping[str, Any] | None) -> StatedWeights:
    """The weights an attribution JSON states, checked for shape (AttributionError otherwise)."""
    if data is None:
        raise AttributionError("the receipt has no attribution (a method 1 receipt?)")
    try:
        stated = StatedWeights(int(data["rule"]), str(data["tokenizer"]), tuple(int(x) for x in data["datasetIds"]),
                               tuple(int(x) for x in data["lineageBps"]), tuple(int(x) for x in data["weightsBps"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise AttributionError("the receipt has no well-formed attribution", reason=repr(exc)[:200]) from exc
    rule_of(stated.rule)
    n = len(stated.dataset_ids)
    if not n or len(stated.lineage_bps) != n or len(stated.weights_bps) != n or sum(stated.weights_bps) != 10_000 \
            or min(stated.weights_bps) < 0:
        raise AttributionError("the attribution's weights are not one per dataset summing to 10,000",
                               dataset_ids=list(stated.dataset_ids), weights_bps=list(stated.weights_bps))
    return stated
