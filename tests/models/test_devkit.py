"""The devkit's tiny folders load with the stock Hugging Face classes, offline."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from node.devkit import make_tiny_model
from tests.fixtures.models import TinyAdapters


def test_tiny_model_folder_is_a_sharded_hf_checkpoint(tiny_model: Path) -> None:
    assert (tiny_model / "model.safetensors.index.json").exists()
    assert len(list(tiny_model.glob("model-*.safetensors"))) >= 2
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    ids = tokenizer("The river runs past the old mill").input_ids
    assert tokenizer.decode(ids) == "The river runs past the old mill"
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert model.config.num_key_value_heads == 2


def test_qwen2_with_tied_embeddings(tmp_path: Path) -> None:
    folder = make_tiny_model(tmp_path, arch="qwen2", tie_embeddings=True, num_layers=1)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["tie_word_embeddings"] is True


def test_adapters_are_peft_folders_that_change_the_logits(
    tiny_model: Path, tiny_adapters: TinyAdapters
) -> None:
    for path in tiny_adapters.paths.values():
        assert sorted(p.name for p in path.iterdir() if p.suffix != ".md") == [
            "adapter_config.json", "adapter_model.safetensors"]
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    ids = torch.tensor([[5, 6, 7, 8]])
    base_logits = base(ids).logits
    model = PeftModel.from_pretrained(base, tiny_adapters.paths["sea-r8"])
    assert (model(ids).logits - base_logits).abs().max() > 1e-2
