"""Packing cuts the token stream into model-length sequences: every token once, in order, none made up."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from node.training.packing import IGNORE_INDEX, PackedSequences


@pytest.mark.parametrize(("num_tokens", "seq_len"), [(1000, 128), (1024, 128), (5, 8), (129, 128)])
def test_every_token_appears_once_in_order_in_sequences_of_the_right_length(num_tokens: int, seq_len: int) -> None:
    tokens = np.arange(num_tokens, dtype=np.uint16)
    packed = PackedSequences(tokens, seq_len)
    sequences = [packed.sequence(i) for i in range(len(packed))]
    assert np.array_equal(np.concatenate(sequences), tokens)
    assert all(len(s) == seq_len for s in sequences[:-1])
    assert 1 <= len(sequences[-1]) <= seq_len


def test_an_epoch_visits_every_sequence_once_in_an_order_fixed_by_seed_and_epoch() -> None:
    packed = PackedSequences(np.arange(10_000), 100)
    order = packed.order(seed=3, epoch=0)
    assert sorted(order.tolist()) == list(range(100))
    assert np.array_equal(order, packed.order(seed=3, epoch=0))
    assert not np.array_equal(order, packed.order(seed=3, epoch=1))
    assert not np.array_equal(order, packed.order(seed=4, epoch=0))


def test_a_batch_with_the_short_last_sequence_pads_it_out_of_the_loss() -> None:
    packed = PackedSequences(np.arange(1, 251), 100, pad_id=0)  # sequences of 100, 100 and 50 tokens
    batch = packed.batch([2, 0])
    assert batch.input_ids.shape == (2, 100)
    assert torch.equal(batch.input_ids[0, :50], torch.arange(201, 251))
    assert (batch.labels[0, 50:] == IGNORE_INDEX).all() and (batch.input_ids[0, 50:] == 0).all()
    assert batch.num_tokens == 150 and batch.num_targets == 148
    full = packed.batch([0, 1])
    assert torch.equal(full.labels, full.input_ids)
