"""Phi-3 against transformers + peft: its fused qkv_proj and gate_up_proj load into our fused
matrices, and adapters peft trained on the fused projections are served as LoRAs on their parts."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.devkit import make_tiny_model
from node.lora.adapter import LoRATargetSpec, load_lora_adapter
from node.models.config import ModelConfig
from tests.models.parity import assert_matches_peft, train_adapters

PHI3_TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")  # the modules Phi-3 has
LONGROPE = {"rope_type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.0, 3.5],
            "long_factor": [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0]}
VARIANTS = {
    "gqa": dict(),
    # prompt + completion inside original_max_position_embeddings: the short factors, and the
    # attention factor of max_position_embeddings / original = 4
    "longrope-short": dict(rope_parameters=LONGROPE, original_max_position_embeddings=32,
                           max_position_embeddings=128),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_phi3_with_fused_projection_adapters_matches_peft(variant: str, tmp_path: Path) -> None:
    model = make_tiny_model(tmp_path / "model", arch="phi3", seed=13, **VARIANTS[variant])  # type: ignore[arg-type]
    assert_matches_peft(model, train_adapters(model, tmp_path, PHI3_TARGETS))


def test_a_fused_adapter_becomes_its_parts(tmp_path: Path) -> None:
    model = make_tiny_model(tmp_path / "model", arch="phi3", seed=13)
    adapters = train_adapters(model, tmp_path, ("qkv_proj", "gate_up_proj"))
    cfg = ModelConfig.from_folder(model)
    target = LoRATargetSpec.of(cfg.num_layers, cfg.module_shapes(), cfg.fused_modules())
    weights = load_lora_adapter(adapters["sea-r8"], target, max_rank=8)
    assert {m for _, m in weights.ranks} == {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}
    (a_q, b_q), (a_v, b_v) = weights.modules[(0, "q_proj")], weights.modules[(0, "v_proj")]
    assert (a_q == a_v).all() and b_q.shape[0] == cfg.q_size and b_v.shape[0] == cfg.kv_size
