"""Our forward pass against transformers for every supported architecture variant."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from node.devkit import make_tiny_model
from node.engine import EngineConfig, LLMEngine, SamplingParams
from node.engine.sequence import Sequence
from node.errors import ModelFormatError
from node.models.config import ModelConfig
from tests.engine.reference import chosen_tokens

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
VARIANTS: dict[str, dict[str, Any]] = {
    "llama-gqa-llama3-rope": dict(arch="llama", rope_scaling=LLAMA3_ROPE),
    "llama-mha-tied": dict(arch="llama", num_kv_heads=4, tie_embeddings=True),
    "llama-linear-rope": dict(arch="llama", rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "mistral": dict(arch="mistral"),
    "qwen2-qkv-bias-tied": dict(arch="qwen2", tie_embeddings=True, num_kv_heads=1),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_prefill_and_decode_logits_match_transformers(variant: str, tmp_path: Path) -> None:
    folder = make_tiny_model(tmp_path, **VARIANTS[variant], seed=5)
    engine = LLMEngine(EngineConfig(model_path=folder, block_size=4, max_model_len=64))
    rows: dict[str, list[torch.Tensor]] = {}

    def observe(seqs: list[Sequence], logits: torch.Tensor) -> None:
        for seq, row in zip(seqs, logits, strict=True):
            rows.setdefault(seq.request_id, []).append(row.clone())

    engine.runner.logits_observer = observe
    prompts = ["The river runs past the old mill", "Bees", "Numbers are counted one, two"]
    outs = engine.generate(prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    for out in outs:
        ours = torch.stack(rows[out.request_id])  # [12, vocab]
        full = out.prompt_token_ids + chosen_tokens(out.token_ids, ours)
        with torch.inference_mode():
            expected = reference(torch.tensor([full[:-1]])).logits[0, len(out.prompt_token_ids) - 1:]
        assert (ours - expected).abs().max().item() < 1e-4, variant


def test_unsupported_rope_types_and_options_are_refused(tmp_path: Path) -> None:
    raw = json.loads((make_tiny_model(tmp_path) / "config.json").read_text())
    with pytest.raises(ModelFormatError, match="proportional"):
        ModelConfig.from_dict(raw | {"rope_parameters": {"rope_type": "proportional", "rope_theta": 1e4}})
    with pytest.raises(ModelFormatError, match="partial rotary"):
        ModelConfig.from_dict(raw | {"partial_rotary_factor": 0.5})
    with pytest.raises(ModelFormatError, match="gelu_new"):
        ModelConfig.from_dict(raw | {"hidden_act": "gelu_new"})


def test_a_folder_without_safetensors_is_refused(tmp_path: Path) -> None:
    folder = make_tiny_model(tmp_path / "m")
    for f in folder.glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    (folder / "model.safetensors.index.json").unlink(missing_ok=True)
    with pytest.raises(ModelFormatError, match="pickled checkpoints are refused"):
        LLMEngine(EngineConfig(model_path=folder))
