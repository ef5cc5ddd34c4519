"""Datasets are tokenized once, streamed to a memory-mapped file, and only if their hash is the registered one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from node.errors import BadRequest
from node.lora.content_hash import dataset_content_hash
from node.training.token_file import tokenize_datasets
from tests.training.conftest import CORPUS, write_dataset


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(tiny_model)


def test_tokens_are_the_whole_text_tokenized_framed_by_bos_and_eos(tokenizer: PreTrainedTokenizerBase,
                                                                   tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "d.txt", 20_000)
    # pieces of 1 KiB cut after a newline, batches of 4 KiB: the stream is read in many parts
    tf = tokenize_datasets(tokenizer, [(data, dataset_content_hash(data))], tmp_path / "tok", piece_chars=1024,
                           batch_chars=4096)
    expected = [tokenizer.bos_token_id, *tokenizer(data.read_text(), add_special_tokens=False)["input_ids"],
                tokenizer.eos_token_id]
    tokens = tf.tokens()
    assert isinstance(tokens, np.memmap)
    assert tokens.tolist() == expected
    assert tf.datasets[0].num_chars == len(data.read_text()) and tf.datasets[0].num_documents == 1


def test_a_second_run_reuses_the_token_file(tokenizer: PreTrainedTokenizerBase, tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "d.txt", 5_000)
    first = tokenize_datasets(tokenizer, [(data, dataset_content_hash(data))], tmp_path / "tok")
    written_at, ids = first.path.stat().st_mtime_ns, first.tokens().tolist()
    second = tokenize_datasets(tokenizer, [(data, dataset_content_hash(data))], tmp_path / "tok")
    assert second == first and second.path.stat().st_mtime_ns == written_at
    with open(first.path, "r+b") as f:
        f.truncate(10)  # cut short (a disk that filled up, a copy that stopped): tokenized again
    third = tokenize_datasets(tokenizer, [(data, dataset_content_hash(data))], tmp_path / "tok")
    assert third == first and third.tokens().tolist() == ids


def test_a_folder_dataset_is_its_text_files_in_order_hashed_with_the_folder_rule(
        tokenizer: PreTrainedTokenizerBase, tmp_path: Path) -> None:
    folder = tmp_path / "set"
    (folder / "b").mkdir(parents=True)
    (folder / "a.txt").write_text("one two three\n")
    (folder / "b" / "c.md").write_text("the sea\n")
    (folder / "blank.txt").write_text("  \n")
    (folder / "image.png").write_bytes(b"\x89PNG not text")
    tf = tokenize_datasets(tokenizer, [(folder, dataset_content_hash(folder))], tmp_path / "tok")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    ids = [bos, *tokenizer("one two three\n", add_special_tokens=False)["input_ids"], eos,
           bos, *tokenizer("the sea\n", add_special_tokens=False)["input_ids"], eos]
    assert tf.tokens().tolist() == ids and tf.datasets[0].num_documents == 2


def test_a_dataset_whose_bytes_are_not_the_registered_ones_is_refused_and_nothing_is_kept(
        tokenizer: PreTrainedTokenizerBase, tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "d.txt", 5_000)
    registered = dataset_content_hash(data)
    data.write_text(CORPUS.replace("sea", "see"))  # changed after it was registered
    with pytest.raises(BadRequest, match="does not match its registered hash"):
        tokenize_datasets(tokenizer, [(data, registered)], tmp_path / "tok")
    assert list((tmp_path / "tok").iterdir()) == []
    folder = tmp_path / "set"
    folder.mkdir()
    (folder / "a.txt").write_text("one two three\n")
    registered = dataset_content_hash(folder)
    (folder / "extra.bin").write_bytes(b"\0")  # a file the folder rule covers though it is not text
    with pytest.raises(BadRequest, match="does not match its registered hash"):
        tokenize_datasets(tokenizer, [(folder, registered)], tmp_path / "tok")
