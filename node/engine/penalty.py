"""Per-row adjustments of the logits before sampling, batched over the rows that ask for them.

In this order (each on the result of the one before), for a row with params `p`:
1. repetition (HF semantics): every token seen in prompt + output so far: logit / p if the logit is
   > 0, else logit * p (p > 1 discourages repeating, p < 1 encourages it);
2. frequency and presence (OpenAI semantics), over the output only:
   logit -= frequency * count(token) + presence * (count(token) > 0);
3. logit_bias: logit += bias for each (token id, bias);
4. min_tokens: while the output has fewer than `min_tokens` tokens, the end-of-sequence tokens (unless
   `ignore_eos`) and `stop_token_ids` get -inf, so the answer cannot end there.
Rows with none of these are left untouched; when no row has any, the logits are returned as they came.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from node.engine.sampling import SamplingParams


def adjust_logits(logits: torch.Tensor, params: list[SamplingParams], prompts: Sequence[Sequence[int]],
                  outputs: Sequence[Sequence[int]], eos_token_ids: frozenset[int]) -> torch.Tensor:
    """logits [N, vocab] -> adjusted logits [N, vocab] (a new tensor when any row is adjusted)."""
    if not any(p.is_adjusted for p in params):
        return logits
    logits = logits.clone()
    rows = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
    if rows:
        _repetition(logits, rows, [params[i].repetition_penalty for i in rows],
                    [[*prompts[i], *outputs[i]] for i in rows])
    rows = [i for i, p in enumerate(params) if p.frequency_penalty or p.presence_penalty]
    if rows:
        _frequency_presence(logits, rows, [params[i] for i in rows], [outputs[i] for i in rows])
    _bias(logits, params)
    _min_tokens(logits, params, outputs, eos_token_ids)
    return logits


def token_counts(histories: list[Sequence[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[R, vocab] int: how often each token id occurs in each row's history."""
    width = max((len(h) for h in histories), default=0)
    counts = torch.zeros(len(histories), vocab + 1, dtype=torch.int32, device=device)  # column vocab: padding
    if width:
        padded = torch.full((len(histories), width), vocab, dtype=torch.long)  # [R, width]
        for r, h in enumerate(histories):
            padded[r, :len(h)] = torch.as_tensor(list(h), dtype=torch.long)
        padded = padded.to(device)
        counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=torch.int32))
    return counts[:, :vocab]


def _repetition(logits: torch.Tensor, rows: list[int], penalties: list[float],
                histories: list[Sequence[int]]) -> None:
    index = torch.tensor(rows, device=logits.device)
    seen = token_counts(histories, logits.shape[-1], logits.device) > 0  # [R, vocab]
    penalty = torch.tensor(penalties, dtype=logits.dtype, device=logits.device)[:, None]  # [R, 1]
    selected = logits.index_select(0, index)  # [R, vocab]
    penalised = torch.where(selected > 0, selected / penalty, selected * penalty)
    logits.index_copy_(0, index, torch.where(seen, penalised, selected))


def _frequency_presence(logits: torch.Tensor, rows: list[int], params: list[SamplingParams],
                        outputs: list[Sequence[int]]) -> None:
    index = torch.tensor(rows, device=logits.device)
    counts = token_counts(outputs, logits.shape[-1], logits.device).to(logits.dtype)  # [R, vocab]
    frequency = torch.tensor([p.frequency_penalty for p in params], dtype=logits.dtype, device=logits.device)
    presence = torch.tensor([p.presence_penalty for p in params], dtype=logits.dtype, device=logits.device)
    delta = frequency[:, None] * counts + presence[:, None] * (counts > 0).to(logits.dtype)  # [R, vocab]
    logits.index_copy_(0, index, logits.index_select(0, index) - delta)


def _bias(logits: torch.Tensor, params: list[SamplingParams]) -> None:
    entries = [(i, t, b) for i, p in enumerate(params) for t, b in p.logit_bias]
    if not entries:
        return
    rows, cols, values = zip(*entries, strict=True)
    assert max(cols) < logits.shape[-1], "logit_bias ids are checked against the vocabulary on admission"
    device = logits.device
    logits.index_put_((torch.tensor(rows, device=device), torch.tensor(cols, device=device)),
                      torch.tensor(values, dtype=logits.dtype, device=device), accumulate=True)


def _min_tokens(logits: torch.Tensor, params: list[SamplingParams], outputs: Sequence[Sequence[int]],
                eos_token_ids: frozenset[int]) -> None:
    vocab = logits.shape[-1]
    entries = [(i, t) for i, p in enumerate(params) if len(outputs[i]) < p.min_tokens
               for t in {*p.stop_token_ids, *(() if p.ignore_eos else eos_token_ids)} if t < vocab]
    if entries:
        rows, cols = zip(*entries, strict=True)
        logits[torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device)] = float("-inf")
