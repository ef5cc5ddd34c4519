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

The counts behind 1. and 2. are kept per sequence from step to step (`TokenCounts`): a step counts only the
tokens appended since the one before, and the prompt once, so a row costs a step the same at its 4,000th
token as at its first (rebuilt from the whole history each step, an answer cost quadratically in its length).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from node.engine.sampling import SamplingParams


class TokenCounts:
    """One sequence's history as [vocab] tensors, kept up to date a step at a time: which tokens its
    prompt holds (counted once) and how often each occurs in its output (`output` only ever grows). Made on
    the logits' device at its first penalised step (5 bytes a vocabulary entry), freed with the sequence."""

    def __init__(self, prompt: Sequence[int], output: Sequence[int]) -> None:
        self.prompt, self.output = prompt, output
        self._in_prompt: torch.Tensor | None = None  # [vocab] bool
        self._output_counts: torch.Tensor | None = None  # [vocab] int32, of output[:_num_counted]
        self._num_counted = 0

    def seen(self, vocab: int, device: torch.device) -> torch.Tensor:
        """[vocab] bool: the tokens in the prompt or the output so far."""
        if not _fits(self._in_prompt, vocab, device):
            self._in_prompt = token_counts([self.prompt], vocab, device)[0] > 0
        assert self._in_prompt is not None
        return self._in_prompt | (self.output_counts(vocab, device) > 0)

    def output_counts(self, vocab: int, device: torch.device) -> torch.Tensor:
        """[vocab] int32: how often each token occurs in the output so far."""
        if self._output_counts is None or not _fits(self._output_counts, vocab, device):
            self._output_counts, self._num_counted = torch.zeros(vocab, dtype=torch.int32, device=device), 0
        if self._num_counted < len(self.output):
            self._output_counts += token_counts([self.output[self._num_counted:]], vocab, device)[0]
            self._num_counted = len(self.output)
        return self._output_counts


def _fits(kept: torch.Tensor | None, vocab: int, device: torch.device) -> bool:
    return kept is not None and kept.shape[0] == vocab and kept.device == device


def adjust_logits(logits: torch.Tensor, params: list[SamplingParams], prompts: Sequence[Sequence[int]],
                  outputs: Sequence[Sequence[int]], eos_token_ids: frozenset[int],
                  kept: Sequence[TokenCounts] = ()) -> torch.Tensor:
    """logits [N, vocab] -> adjusted logits [N, vocab] (a new tensor when any row is adjusted). `kept`: each
    row's counts, kept across steps (the engine's sequences'); empty: counted afresh from the histories."""
    if not any(p.is_adjusted for p in params):
        return logits
    logits = logits.clone()
    counts = list(kept) or [TokenCounts(prompt, output) for prompt, output in zip(prompts, outputs, strict=True)]
    vocab, device = logits.shape[-1], logits.device
    rows = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
    if rows:
        seen = torch.stack([counts[i].seen(vocab, device) for i in rows])  # [R, vocab]
        _repetition(logits, rows, [params[i].repetition_penalty for i in rows], seen)
    rows = [i for i, p in enumerate(params) if p.frequency_penalty or p.presence_penalty]
    if rows:
        found = torch.stack([counts[i].output_counts(vocab, device) for i in rows])  # [R, vocab]
        _frequency_presence(logits, rows, [params[i] for i in rows], found)
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


def _repetition(logits: torch.Tensor, rows: list[int], penalties: list[float], seen: torch.Tensor) -> None:
    """`seen` [R, vocab] bool: the tokens in each row's prompt or output."""
    index = torch.tensor(rows, device=logits.device)
    penalty = torch.tensor(penalties, dtype=logits.dtype, device=logits.device)[:, None]  # [R, 1]
    selected = logits.index_select(0, index)  # [R, vocab]
    penalised = torch.where(selected > 0, selected / penalty, selected * penalty)
    logits.index_copy_(0, index, torch.where(seen, penalised, selected))


def _frequency_presence(logits: torch.Tensor, rows: list[int], params: list[SamplingParams],
                        found: torch.Tensor) -> None:
    """`found` [R, vocab] int: how often each token occurs in each row's output."""
    index = torch.tensor(rows, device=logits.device)
    counts = found.to(logits.dtype)  # [R, vocab]
    frequency = torch.tensor([p.frequency_penalty for p in params], dtype=logits.dtype, device=logits.device)
    presence = torch.tensor([p.presence_penalty for p in params], dtype=logits.dtype, device=logits.device)
    delta = frequency[:, None] * counts + presence[:, None] * (counts > 0).to(logits.dtype)  # [R, vocab]
    logits.index_copy_(0, index, logits.index_select(0, index) - delta)


def _bias(logits: torch.Tensor, params: list[SamplingParams]) -> None:
    rows = [i for i, p in enumerate(params) if p.logit_bias]
    if not rows:
        return
    ids, biases = zip(*(params[i].bias_tensors for i in rows), strict=True)  # laid out once per request
    cols = torch.cat(ids)  # [E]: every row's entries, row after row
    assert int(cols.max()) < logits.shape[-1], "logit_bias ids are checked against the vocabulary on admission"
    row_of = torch.repeat_interleave(torch.tensor(rows), torch.tensor([len(t) for t in ids]))  # [E]
    device = logits.device
    logits.index_put_((row_of.to(device), cols.to(device)), torch.cat(biases).to(device, logits.dtype),
                      accumulate=True)


def _min_tokens(logits: torch.Tensor, params: list[SamplingParams], outputs: Sequence[Sequence[int]],
                eos_token_ids: frozenset[int]) -> None:
    vocab = logits.shape[-1]
    entries = [(i, t) for i, p in enumerate(params) if len(outputs[i]) < p.min_tokens
               for t in {*p.stop_token_ids, *(() if p.ignore_eos else eos_token_ids)} if t < vocab]
    if entries:
        rows, cols = zip(*entries, strict=True)
        logits[torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device)] = float("-inf")
