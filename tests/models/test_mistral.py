"""Mistral served past its sliding window: the paged cache keeps every key, attention masks those
that fell out of the window, and the output is transformers' (+ peft's) token for token."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.devkit import make_tiny_model
from node.devkit.tiny_adapter import ALL_TARGETS
from tests.models.parity import assert_matches_peft, train_adapters


@pytest.mark.parametrize(("window", "step_tokens"), [(3, 4096), (8, 4096), (5, 6)])
def test_mistral_past_its_window_matches_peft(window: int, step_tokens: int, tmp_path: Path) -> None:
    """step_tokens 6: prompts prefilled in chunks of a few tokens, each chunk's queries windowed
    over keys cached by the chunks before."""
    model = make_tiny_model(tmp_path / "model", arch="mistral", sliding_window=window, seed=11)
    tokens = assert_matches_peft(model, train_adapters(model, tmp_path, ALL_TARGETS), max_tokens=14,
                                 max_num_batched_tokens=step_tokens)
    assert all(len(t) == 14 for t in tokens)  # prompt + completion run 3 to 7 windows long
