"""Qwen3 (a per-head RMSNorm of q and k before the rotation) against transformers + peft."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.devkit import make_tiny_model
from node.devkit.tiny_adapter import ALL_TARGETS
from tests.models.parity import assert_matches_peft, train_adapters

VARIANTS = {
    "gqa": dict(num_kv_heads=2),
    "tied-mha-sliding-upper-layer": dict(num_kv_heads=4, tie_embeddings=True, use_sliding_window=True,
                                         sliding_window=5, max_window_layers=1),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_qwen3_with_and_without_adapters_matches_peft(variant: str, tmp_path: Path) -> None:
    model = make_tiny_model(tmp_path / "model", arch="qwen3", random_norms=True, seed=3, **VARIANTS[variant])
    assert_matches_peft(model, train_adapters(model, tmp_path, ALL_TARGETS))
