"""`adapter train` shows its progress: steps, tokens/s, loss and the time left, live or as log lines."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
from transformers import AutoTokenizer

from node.cli.training_progress import TrainingProgress
from node.lora.content_hash import dataset_content_hash
from node.training.lora_trainer import LoRATrainer, TrainingConfig, TrainingPlan
from node.training.packing import PackedSequences
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
    assert re.search(rf"training on {tokens.num_tokens:,} tokens: [\d,]+ sequences of 32 tokens( \(the last \d+\))?, "
                     r"3 steps", out), out
    lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert len(lines) == 3
    for n, line in enumerate(lines, start=1):
        assert re.fullmatch(rf"step {n}/3  [\d,]+ tok/s  loss \d+\.\d{{3}}  ETA \d+:\d\d:\d\d", line), line


def test_a_terminal_shows_a_live_bar_with_the_same_figures(tiny_model: Path, tokens: TokenFile,
                                                           tmp_path: Path) -> None:
    terminal = Console(file=io.StringIO(), force_terminal=True, color_system=None, width=200)
    out = _train(tiny_model, tokens, tmp_path, terminal)
    assert re.search(r"step 3/3 .* [\d,]+ tok/s loss \d+\.\d{3} ETA", out), out[-400:]


@pytest.mark.parametrize(("num_tokens", "seq_len", "shown"), [
    (34, 2048, "1 sequence of 34 tokens (--seq-len 2048)"),  # padded to 34, not to 2048
    (250, 100, "3 sequences of 100 tokens (the last 50)"),
    (200, 100, "2 sequences of 100 tokens"),
])
def test_the_plan_line_shows_the_sequences_as_packed(num_tokens: int, seq_len: int, shown: str) -> None:
    packed = PackedSequences(np.arange(num_tokens), seq_len)
    plan = TrainingPlan(num_tokens, len(packed), seq_len, steps_per_epoch=1, total_steps=4, start_step=0)
    assert [len(packed.sequence(i)) for i in range(len(packed))][-1] == plan.last_len
    console = Console(file=io.StringIO(), force_terminal=False, width=200)
    TrainingProgress(console).on_start(plan)
    assert console.file.getvalue() == f"training on {num_tokens:,} tokens: {shown}, 4 steps (1 per epoch)\n"  # type: ignore[attr-defined]
