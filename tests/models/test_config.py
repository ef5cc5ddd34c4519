"""Which architectures a node serves: an unsupported one is refused at load, by name, with the list."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from node.cli.console import describe, print_failure
from node.engine import EngineConfig, LLMEngine
from node.errors import UnsupportedArchitecture
from node.models.config import SUPPORTED_TYPES, ModelConfig

GPT2 = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 64, "n_layer": 2, "vocab_size": 64}


def test_an_unsupported_architecture_is_refused_at_load_naming_it_and_the_supported_ones(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "config.json").write_text(json.dumps(GPT2))
    with pytest.raises(UnsupportedArchitecture) as refused:
        LLMEngine(EngineConfig(model_path=tmp_path))
    assert refused.value.facts == {"model_type": "gpt2"}
    print_failure(describe(refused.value))  # what `loranode api` prints when its engine cannot start
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and "unsupported_architecture" in line and "GPT2LMHeadModel" in line
    assert all(name in line for name in ("gemma2", "gemma3_text", "phi3", "qwen3", "mistral", "llama", "qwen2"))


def test_gemma3_multimodal_checkpoints_are_refused_text_ones_served() -> None:
    assert "gemma3_text" in SUPPORTED_TYPES
    with pytest.raises(UnsupportedArchitecture, match="'gemma3'"):
        ModelConfig.from_dict({"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"]})
