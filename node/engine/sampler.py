"""The sampling pipeline of one step, per row of the batch:

    adjust (penalties, logit_bias, min_tokens) -> mask (allowed tokens) -> temperature, top-k, top-p
    -> draw -> logprobs (of the adjusted, masked distribution)

Every stage leaves rows that do not use it untouched, so a batch mixes any requests.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from node.engine.logprob import TokenLogprob, token_logprobs
from node.engine.penalty import adjust_logits
from node.engine.sampling import SamplingParams, sample


@dataclass(frozen=True)
class SamplingBatch:
    """What the sampler needs of each sampled row, in row order."""

    params: list[SamplingParams]
    generators: list[torch.Generator | None]
    prompt_token_ids: Sequence[Sequence[int]]
    output_token_ids: Sequence[Sequence[int]]


@dataclass(frozen=True)
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]  # None for a row that asked for none


class Sampler:
    def __init__(self, eos_token_ids: frozenset[int] = frozenset()) -> None:
        self.eos_token_ids = eos_token_ids

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        """logits [N, vocab] float32 -> one token per row (and its logprobs where asked)."""
        logits = adjust_logits(logits, batch.params, batch.prompt_token_ids, batch.output_token_ids,
                               self.eos_token_ids)
        # a per-sequence allowed-token mask (structured output) applies here, on the adjusted logits
        token_ids = sample(logits, batch.params, batch.generators)
        return SamplerOutput(token_ids, token_logprobs(logits, token_ids, batch.params))
