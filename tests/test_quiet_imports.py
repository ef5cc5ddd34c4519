"""A user's terminal shows what loranode says, not the noise of the libraries under it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_importing_the_training_and_devkit_stack_prints_no_library_noise() -> None:
    # peft imports torchao, which warns about CUDA-only kernels it cannot load on this machine and
    # registers enums the way torch deprecates: two lines each that every `make demo` used to print
    done = subprocess.run([sys.executable, "-c", "import node.devkit, peft, torchao"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Failed to load" not in done.stderr and "Enum subclass" not in done.stderr, done.stderr


def test_the_filter_keeps_every_other_warning_of_those_libraries() -> None:
    script = ("import logging, node; logging.basicConfig(); "
              "logging.getLogger('torchao').warning('something that matters')")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert "something that matters" in done.stderr


TRAIN_ONE_STEP = """
import sys
from pathlib import Path
from pathlib import Path
from transformers import AutoTokenizer
from node.lora.content_hash import dataset_content_hash
from node.training.lora_trainer import LoRATrainer, TrainingConfig
from node.training.token_file import tokenize_datasets
model, data = Path(sys.argv[1]), Path(sys.argv[2])
tokenizer = AutoTokenizer.from_pretrained(model)
tokens = tokenize_datasets(tokenizer, [(data, dataset_content_hash(data))], data.parent / "tok")
config = TrainingConfig(rank=2, alpha=4, seq_len=32, max_steps=1)
LoRATrainer(model, config, device="cpu").train(tokens, data.parent / "out")
"""


def test_training_an_adapter_prints_no_library_progress_bars_or_deprecations(tiny_model: Path, tmp_path: Path) -> None:
    # `loranode adapter train` used to print transformers' "Loading weights" bar and a FutureWarning
    # peft triggers inside transformers, between its own progress lines
    data = tmp_path / "d.txt"
    data.write_text("the sea is calm tonight and the boats rest in the harbour\n" * 20)
    done = subprocess.run([sys.executable, "-W", "default", "-c", TRAIN_ONE_STEP, str(tiny_model), str(data)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert "Loading weights" not in done.stderr and "Warning" not in done.stderr, done.stderr
