"""A token stream packed into fixed-length sequences, served as padded mini-batches in a seeded order.

Sequence `i` is tokens `[i * seq_len, (i + 1) * seq_len)` of the stream; the last one holds what is left
(shorter), so every token is in exactly one sequence, in order. An epoch visits every sequence once in
a permutation drawn from (seed, epoch): the order is a function of the position alone, which is what
a checkpoint records to resume.

Padding goes on the right and needs no attention mask: in a causal model a real token attends only to
the tokens before it, all real, so its output is the same with or without the pad tokens after it,
and the pads' own outputs have no label. Without a mask the model keeps its causal attention kernel
(with one it builds a [batch, 1, length, length] mask and takes the masked path).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

IGNORE_INDEX = -100  # labels that do not count in the loss (padding)


@dataclass(frozen=True)
class MicroBatch:
    input_ids: torch.Tensor  # [batch, length] int64
    labels: torch.Tensor  # [batch, length] int64, IGNORE_INDEX where padded (on the right)
    num_tokens: int  # real tokens (not padding)
    num_targets: int  # tokens with a next token to predict: what the loss averages over


class PackedSequences:
    """`tokens` (any 1-D integer array, typically a memmap) cut into sequences of `seq_len`."""

    def __init__(self, tokens: np.ndarray, seq_len: int, *, pad_id: int = 0) -> None:
        assert seq_len >= 2, "a sequence needs at least one token to predict"
        self.tokens = tokens
        self.seq_len = seq_len
        self.pad_id = pad_id

    def __len__(self) -> int:
        return -(-len(self.tokens) // self.seq_len)

    def sequence(self, index: int) -> np.ndarray:
        """The token ids of sequence `index` (a copy, read from the underlying array)."""
        start = index * self.seq_len
        return np.array(self.tokens[start:start + self.seq_len], dtype=np.int64)

    def order(self, seed: int, epoch: int) -> np.ndarray:
        """The permutation of sequence indices that epoch `epoch` visits."""
        return np.random.default_rng([seed, epoch]).permutation(len(self))

    def batch(self, indices: Sequence[int] | np.ndarray) -> MicroBatch:
        """The sequences at `indices`, right-padded to the longest of them (no mask needed: see above)."""
        rows = [self.sequence(int(i)) for i in indices]
        length = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), length), self.pad_id, dtype=torch.int64)  # [batch, length]
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.int64)  # [batch, length]
        for row, ids in enumerate(rows):
            input_ids[row, :len(ids)] = torch.from_numpy(ids)
            labels[row, :len(ids)] = torch.from_numpy(ids)
        num_tokens = sum(len(r) for r in rows)
        return MicroBatch(input_ids, labels, num_tokens, num_tokens - len(rows))
