"""PEFT folders are parsed, validated against the base model and scaled exactly as peft does."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from node.errors import AdapterFormatError
from node.lora.adapter import LoRATargetSpec, load_lora_adapter
from node.models.config import ModelConfig
from tests.fixtures.models import TinyAdapters


@pytest.fixture
def target(tiny_model: Path) -> LoRATargetSpec:
    cfg = ModelConfig.from_folder(tiny_model)
    return LoRATargetSpec.of(cfg.num_layers, cfg.module_shapes())


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_scaling_is_folded_into_b(tiny_adapters: TinyAdapters, target: LoRATargetSpec) -> None:
    path = tiny_adapters.paths["sea-r8"]  # alpha 16, r 8: scale 2
    raw = load_file(path / "adapter_model.safetensors")
    weights = load_lora_adapter(path, target, max_rank=16)
    a, b = weights.modules[(1, "down_proj")]
    prefix = "base_model.model.model.layers.1.mlp.down_proj"
    assert torch.equal(a, raw[f"{prefix}.lora_A.weight"])
    assert torch.allclose(b, raw[f"{prefix}.lora_B.weight"] * 2.0)
    assert weights.rank == 8 and len(weights.modules) == 2 * 7
    assert weights.nbytes == sum(t.numel() * 4 for t in raw.values())


def test_rslora_scales_by_the_square_root_of_the_rank(tiny_adapters: TinyAdapters,
                                                      target: LoRATargetSpec) -> None:
    path = tiny_adapters.paths["food-r16"]  # alpha 16, r 16, rsLoRA: scale 16 / 4 = 4
    raw = load_file(path / "adapter_model.safetensors")
    _, b = load_lora_adapter(path, target, max_rank=16).modules[(0, "q_proj")]
    assert torch.allclose(b, raw["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"] * 4.0)


def test_rank_above_the_limit_is_refused(tiny_adapters: TinyAdapters, target: LoRATargetSpec) -> None:
    with pytest.raises(AdapterFormatError, match="rank 16 exceeds max_lora_rank 8"):
        load_lora_adapter(tiny_adapters.paths["food-r16"], target, max_rank=8)


def test_pickled_weights_are_refused(tiny_adapters: TinyAdapters, target: LoRATargetSpec,
                                     tmp_path: Path) -> None:
    folder = _copy(tiny_adapters.paths["sea-r8"], tmp_path / "a")
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    with pytest.raises(AdapterFormatError, match=r"pickled files are refused: \['adapter_model.bin'\]"):
        load_lora_adapter(folder, target, max_rank=16)


def test_every_problem_is_named_in_one_error(tiny_adapters: TinyAdapters, target: LoRATargetSpec,
                                             tmp_path: Path) -> None:
    folder = _copy(tiny_adapters.paths["sea-r8"], tmp_path / "a")
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(use_dora=True, modules_to_save=["lm_head"])
    (folder / "adapter_config.json").write_text(json.dumps(config))
    tensors = load_file(folder / "adapter_model.safetensors")
    prefix = "base_model.model.model.layers.0.self_attn"
    tensors[f"{prefix}.q_proj.lora_A.weight"] = torch.zeros(8, 63)  # wrong in_features
    del tensors[f"{prefix}.k_proj.lora_B.weight"]
    tensors["base_model.model.lm_head.lora_A.weight"] = torch.zeros(8, 64)
    tensors["base_model.model.model.layers.5.mlp.up_proj.lora_A.weight"] = torch.zeros(8, 64)
    tensors["base_model.model.model.layers.5.mlp.up_proj.lora_B.weight"] = torch.zeros(192, 8)
    save_file(tensors, folder / "adapter_model.safetensors")
    with pytest.raises(AdapterFormatError) as info:
        load_lora_adapter(folder, target, max_rank=16)
    problems = info.value.facts["problems"]
    assert any("DoRA" in p for p in problems)
    assert any("modules_to_save" in p for p in problems)
    assert any("layers.0.q_proj" in p and "do not fit" in p for p in problems)
    assert any("layers.0.k_proj: lora_B is missing" in p for p in problems)
    assert any("lm_head" in p for p in problems)
    assert any("layers.5.up_proj: the base model has 2 layers" in p for p in problems)
    assert len(problems) == 6


def test_missing_config_and_bad_json(tiny_adapters: TinyAdapters, tmp_path: Path,
                                     target: LoRATargetSpec) -> None:
    with pytest.raises(AdapterFormatError, match=r"adapter_config\.json is missing"):
        load_lora_adapter(tmp_path, target, max_rank=16)
    folder = _copy(tiny_adapters.paths["sea-r8"], tmp_path / "a")
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterFormatError, match="not valid JSON"):
        load_lora_adapter(folder, target, max_rank=16)
