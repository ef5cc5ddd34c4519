"""`adapter train` shows its progress: steps, tokens/s, loss and the time left, live or as log lines."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from rich.console import Console
from transformers import AutoTokenizer

from node.cli.training_progress import TrainingProgress
from node.lora.content_hash import dataset_content_hash
from node.training.lora_trainer import LoRATrainer, TrainingConfig
from node.training.token_file import TokenFile, tokenize_datasets
from tests.training.conftest import write_dataset

CONFIG = TrainingConfig(rank=2, alpha=4, seq_len=32, batch_size=2, max_steps=3, checkpoint_every=0)


@pytest.fixture(scope="module")
def tokens(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> TokenFile:
    data = write_dataset(tmp_path_factory.mktemp("data") / "d.txt", 3_000)
    return tokenize_datasets(AutoTokenizer.from_pretrained(tiny_model), [(data, dataset_content_hash(data))],
                             data.parent / "tok")


def _train(tiny_model: Path, tokens: TokenFile, out: Path, console: Console) -> str:
    with TrainingProgress(console) as progress:
        LoRATrainer(tiny_model, CONFIG, device="cpu").train(tokens, out, observer=progress)
    return console.file.getvalue()  # type: ignore[attr-defined]


def test_a_log_shows_a_line_per_step_with_tokens_per_second_loss_and_eta(tiny_model: Path, tokens: TokenFile,
                                                                          tmp_path: Path) -> None:
    out = _train(tiny_model, tokens, tmp_path, Console(file=io.StringIO(), force_terminal=False, width=200))
    assert f"training on {tokens.num_tokens:,} tokens" in out and "sequences of 32 tokens, 3 steps" in out
    lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert len(lines) == 3
    for n, line in enumerate(lines, start=1):
        assert re.fullmatch(rf"step {n}/3  [\d,]+ tok/s  loss \d+\.\d{{3}}  ETA \d+:\d\d:\d\d", line), line


def test_a_terminal_shows_a_live_bar_with_the_same_figures(tiny_model: Path, tokens: TokenFile,
                                                           tmp_path: Path) -> None:
    terminal = Console(file=io.StringIO(), force_terminal=True, color_system=None, width=200)
    out = _train(tiny_model, tokens, tmp_path, terminal)
    assert re.search(r"step 3/3 .* [\d,]+ tok/s loss \d+\.\d{3} ETA", out), out[-400:]
