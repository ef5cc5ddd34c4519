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


BASE = {"vocab_size": 64, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 6,
        "num_attention_heads": 4, "num_key_value_heads": 2}


def test_older_gemma_configs_are_read_as_transformers_reads_them() -> None:
    """Checkpoints saved before `layer_types` and nested rope parameters existed."""
    gemma2 = ModelConfig.from_dict(BASE | {"model_type": "gemma2", "sliding_window": 8, "rope_theta": 1e4})
    assert [layer.window for layer in gemma2.layers] == [8, None] * 3
    gemma3 = ModelConfig.from_dict(BASE | {"model_type": "gemma3_text", "sliding_window": 8, "rope_theta": 1e6,
                                           "rope_local_base_freq": 1e4,
                                           "rope_scaling": {"rope_type": "linear", "factor": 8.0}})
    assert [layer.window for layer in gemma3.layers] == [8] * 5 + [None]
    local, global_ = gemma3.layers[0].rope, gemma3.layers[5].rope
    assert (local.kind, local.theta) == ("default", 1e4)
    assert (global_.kind, global_.theta, global_.param("factor")) == ("linear", 1e6, 8.0)
    assert gemma3.qk_norm and gemma3.tie_embeddings and gemma3.attn_scale == 256 ** -0.5


def test_windows_apply_where_the_config_turns_them_on() -> None:
    mistral = ModelConfig.from_dict(BASE | {"model_type": "mistral", "sliding_window": None})
    assert {layer.window for layer in mistral.layers} == {None}
    qwen2_off = ModelConfig.from_dict(BASE | {"model_type": "qwen2", "sliding_window": 32, "use_sliding_window": False})
    assert {layer.window for layer in qwen2_off.layers} == {None}
    qwen2_on = ModelConfig.from_dict(BASE | {"model_type": "qwen2", "sliding_window": 32, "use_sliding_window": True,
                                             "max_window_layers": 4})
    assert [layer.window for layer in qwen2_on.layers] == [None] * 4 + [32] * 2
    phi3 = ModelConfig.from_dict(BASE | {"model_type": "phi3", "sliding_window": 16})
    assert {layer.window for layer in phi3.layers} == {16}
