"""Memory stays flat in the dataset's size: the data is streamed to disk and read back memory-mapped."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer

from node.lora.content_hash import dataset_content_hash
from node.training.lora_trainer import LoRATrainer, TrainingConfig
from node.training.token_file import tokenize_datasets
from tests.training.conftest import write_dataset

CONFIG = TrainingConfig(rank=2, alpha=4, seq_len=64, batch_size=2, max_steps=2, checkpoint_every=1)
BATCH_CHARS = 1 << 16  # text tokenized at a time (256 KiB by default: these datasets are kept small)


def _peak_bytes(tiny_model: Path, folder: Path, num_bytes: int) -> tuple[int, int]:
    """Peak Python heap while tokenizing a dataset of `num_bytes` and training 2 steps on it."""
    data = write_dataset(folder / "d.txt", num_bytes)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tracemalloc.start()
    try:
        tokens = tokenize_datasets(tokenizer, [(data, dataset_content_hash(data))], folder / "tok",
                                   piece_chars=1 << 14, batch_chars=BATCH_CHARS)
        assert isinstance(tokens.tokens(), np.memmap)
        LoRATrainer(tiny_model, CONFIG, device="cpu").train(tokens, folder / "out")
        return tracemalloc.get_traced_memory()[1], tokens.num_tokens
    finally:
        tracemalloc.stop()


def test_peak_memory_does_not_grow_with_the_dataset(tiny_model: Path, tmp_path: Path) -> None:
    _peak_bytes(tiny_model, tmp_path / "warm-up", 10_000)  # first-time imports and caches, off the books
    small, small_tokens = _peak_bytes(tiny_model, tmp_path / "small", 200_000)
    large, large_tokens = _peak_bytes(tiny_model, tmp_path / "large", 2_000_000)
    assert large_tokens > 9 * small_tokens
    assert large - small < 1_800_000 // 10, (small, large)  # under a tenth of the text the large one adds
