"""The sampling pipeline of one step, per row of the batch:

    adjust (penalties, logit_bias, min_tokens) -> mask (allowed tokens) -> temperature, top-k, top-p
    -> draw -> logprobs (of the adjusted, masked distribution)

Every stage leaves rows that do not use it untouched, so a batch mixes any requests. A row whose
grammar allows no token at all (a dead end: a schema this node's JSON and UTF-8 rules cannot satisfy,
e.g. a `pattern` that asks for a raw control character) is drawn from nothing: it is reported in
`dead_ends` and its token is none (the engine ends that answer); it must never make the batch fail.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from node.engine.grammar import GrammarState
from node.engine.logprob import TokenLogprob, token_logprobs
from node.engine.penalty import TokenCounts, adjust_logits
from node.engine.sampling import SamplingParams, apply_token_bitmask, sample


@dataclass(frozen=True)
class SamplingBatch:
    """What the sampler needs of each sampled row, in row order."""

    params: list[SamplingParams]
    generators: list[torch.Generator | None]
    prompt_token_ids: Sequence[Sequence[int]]
    output_token_ids: Sequence[Sequence[int]]
    grammars: Sequence[GrammarState | None] = ()  # empty: no row has one
    counts: Sequence[TokenCounts] = ()  # each row's history counts, kept across steps; empty: counted afresh


@dataclass(frozen=True)
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]  # None for a row that asked for none
    dead_ends: frozenset[int] = frozenset()  # rows whose grammar allowed no token: their token means nothing


class Sampler:
    def __init__(self, eos_token_ids: frozenset[int] = frozenset()) -> None:
        self.eos_token_ids = eos_token_ids

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        """logits [N, vocab] float32 -> one token per row (and its logprobs where asked)."""
        rows = [i for i, g in enumerate(batch.grammars) if g is not None]
        raw = logits[rows].clone() if rows else None
        logits = adjust_logits(logits, batch.params, batch.prompt_token_ids, batch.output_token_ids,
                               self.eos_token_ids, batch.counts)
        dead_ends = _mask_grammars(logits, raw, rows, batch.grammars) if raw is not None else []
        if dead_ends:  # nothing to draw from: all -inf would be NaN probabilities, and multinomial raises
            logits[dead_ends] = 0.0
        token_ids = sample(logits, batch.params, batch.generators)
        return SamplerOutput(token_ids, token_logprobs(logits, token_ids, batch.params), frozenset(dead_ends))


def _mask_grammars(logits: torch.Tensor, raw: torch.Tensor, rows: list[int],
                   grammars: Sequence[GrammarState | None]) -> list[int]:
    """In place: each of `rows` of the adjusted logits [N, vocab] keeps only the tokens its grammar allows.
    A row left with none (min_tokens or a -100 bias hid every token the grammar allows, e.g. the end of a
    complete answer) takes its raw logits (`raw`: [len(rows), vocab], before adjustments) under the
    grammar's mask instead: the grammar, which the answer must match, wins over the adjustments. Returns
    the rows whose grammar allows no token at all (their dead ends)."""
    bitmask = torch.full((len(rows), -(-logits.shape[-1] // 32)), -1, dtype=torch.int32)
    for j, i in enumerate(rows):
        grammar = grammars[i]
        assert grammar is not None
        grammar.fill(bitmask, j)
    apply_token_bitmask(logits, bitmask, rows)
    dead = torch.isinf(logits[rows]).all(dim=-1).nonzero().flatten().tolist()  # positions within `rows`
    if dead:
        apply_token_bitmask(raw, bitmask, list(range(len(rows))))
        for j in dead:
            logits[rows[j]] = raw[j]
    return [rows[j] for j in dead if torch.isinf(logits[rows[j]]).all()]
