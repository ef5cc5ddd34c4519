"""RoPE scalings against transformers: the frequencies of its rope_init functions, and whole models
served token for token (yarn in one forward; dynamic NTK and longrope, whose rotation depends on the
sequence length, step by step as transformers decodes over its cache, generating past the trained
length)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from node.devkit import make_tiny_model
from node.devkit.tiny_adapter import ALL_TARGETS
from node.models.config import ModelConfig
from node.models.rotary import inverse_frequencies
from tests.models.parity import PROMPTS, assert_matches_peft, train_adapters

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
DYNAMIC = {"rope_type": "dynamic", "factor": 3.0}
LONGROPE = {"rope_type": "longrope", "original_max_position_embeddings": 16,
            "short_factor": [1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0],
            "long_factor": [1.0, 2.0, 3.0, 5.0, 8.0, 12.0, 16.0, 24.0]}
SCALINGS: dict[str, dict[str, Any]] = {"yarn": YARN, "dynamic": DYNAMIC, "longrope": LONGROPE}


def _configs(scaling: dict[str, Any]) -> tuple[LlamaConfig, ModelConfig]:
    hf = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                     intermediate_size=96, vocab_size=64, max_position_embeddings=16,
                     rope_parameters={"rope_theta": 10000.0, **scaling})
    return hf, ModelConfig.from_dict(hf.to_dict())


@pytest.mark.parametrize("name", sorted(SCALINGS))
@pytest.mark.parametrize("seq_len", [5, 16, 17, 40])
def test_frequencies_at_each_length_are_transformers(name: str, seq_len: int) -> None:
    hf, ours = _configs(SCALINGS[name])
    expected, factor = ROPE_INIT_FUNCTIONS[name](hf, torch.device("cpu"), seq_len=seq_len)
    if name == "dynamic" and seq_len <= 16:  # transformers keeps the trained frequencies there
        expected, factor = ROPE_INIT_FUNCTIONS[name](hf, torch.device("cpu"))
    inv, attention = inverse_frequencies(16, ours.layers[0].rope, max_positions=64)
    # position seq_len - 1 is rotated as transformers rotates a sequence seq_len long
    assert torch.allclose(inv[seq_len - 1], expected, rtol=1e-6, atol=0) and attention == pytest.approx(factor)


MODELS = {
    "yarn": dict(rope=YARN, max_position_embeddings=128, stepwise=False),
    "dynamic-past-trained-length": dict(rope=DYNAMIC, max_position_embeddings=16, stepwise=True),
    "longrope-past-original-length": dict(rope=LONGROPE, max_position_embeddings=48, stepwise=True),
}


@pytest.mark.parametrize("variant", sorted(MODELS))
def test_scaled_rope_models_match_peft(variant: str, tmp_path: Path) -> None:
    spec = MODELS[variant]
    model = make_tiny_model(tmp_path / "model", arch="llama", rope_scaling=spec["rope"], seed=17,
                            max_position_embeddings=spec["max_position_embeddings"])
    # prompts of 2 to 14 tokens (inside the trained length) and 14 more: up to 28 positions
    prompts = PROMPTS[:2] if spec["stepwise"] else PROMPTS  # the 14-token one and a 1-token one
    assert_matches_peft(model, train_adapters(model, tmp_path, ALL_TARGETS), max_tokens=14, prompts=prompts,
                        stepwise_rope=spec["stepwise"], max_model_len=32)
