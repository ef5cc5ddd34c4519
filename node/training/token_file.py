"""Datasets tokenized once into a flat token file on disk, read back memory-mapped.

Each document (a text file of a dataset) is framed by the tokenizer's BOS and EOS tokens and the
documents follow each other in dataset order, so packing cuts one stream. The file is keyed by the
datasets' content hashes and the tokenizer: a second run on the same data reads it instead of
tokenizing again. Text is read and tokenized in bounded batches (`batch_chars`), so memory does not
grow with the dataset, and the file is kept only once every dataset's hash has been checked on the
bytes that were tokenized.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from transformers import PreTrainedTokenizerBase

from node.protocol.hexstr import to_hex
from node.training.dataset_stream import PIECE_CHARS, TextPiece, stream_verified

log = logging.getLogger(__name__)
FORMAT = "loranode-tokens-1"
BATCH_CHARS = 1 << 18  # 256 KiB of text per tokenizer call: peak RSS flat from 2 to 16 MB (1 MiB: +13 MB)


@dataclass(frozen=True)
class DatasetTokens:
    """What one dataset contributed to a token file."""

    content_hash: str  # 0x-hex, as registered
    num_chars: int
    num_tokens: int
    num_documents: int


@dataclass(frozen=True)
class TokenFile:
    """A tokenized stream on disk: `num_tokens` token ids of `dtype`, read as a read-only memmap."""

    path: Path
    key: str  # sha256 hex over the format, the tokenizer and the datasets' hashes
    dtype: str
    datasets: tuple[DatasetTokens, ...]

    @property
    def num_tokens(self) -> int:
        return sum(d.num_tokens for d in self.datasets)

    def tokens(self) -> np.memmap:
        """The token ids, mapped from disk (pages are read as they are touched, never all at once)."""
        return np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.num_tokens,))


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A sha256 hex that changes whenever the tokenizer would give other ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    special = [tokenizer.bos_token_id, tokenizer.eos_token_id]
    return hashlib.sha256(f"{text}\0{special}".encode()).hexdigest()


def tokenize_datasets(
    tokenizer: PreTrainedTokenizerBase,
    datasets: Sequence[tuple[Path, bytes]],
    folder: Path,
    *,
    piece_chars: int = PIECE_CHARS,
    batch_chars: int = BATCH_CHARS,
) -> TokenFile:
    """The token file of `datasets` ((path, registered content hash) pairs, in order) under `folder`.

    Reuses the file of an earlier run with the same datasets and tokenizer; raises BadRequest (and
    keeps nothing) if a dataset's bytes do not match its registered hash.
    """
    parts = [FORMAT, tokenizer_fingerprint(tokenizer), *(h.hex() for _, h in datasets)]
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()
    folder.mkdir(parents=True, exist_ok=True)
    meta_path, bin_path = folder / f"{key[:32]}.json", folder / f"{key[:32]}.bin"
    if meta_path.is_file() and bin_path.is_file():
        cached = _read_meta(meta_path, bin_path)
        if bin_path.stat().st_size == cached.num_tokens * np.dtype(cached.dtype).itemsize:
            log.info("token file %s reused", bin_path)
            return cached
    dtype = "uint16" if len(tokenizer) <= np.iinfo(np.uint16).max else "uint32"
    tmp = bin_path.with_suffix(f".tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as out:
            stats = [_write_dataset(tokenizer, path, expected, out, dtype, piece_chars, batch_chars)
                     for path, expected in datasets]
        os.replace(tmp, bin_path)
    finally:
        tmp.unlink(missing_ok=True)
    token_file = TokenFile(path=bin_path, key=key, dtype=dtype, datasets=tuple(stats))
    meta = {"format": FORMAT, "key": key, "dtype": dtype, "datasets": [d.__dict__ for d in stats]}
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return token_file


def _read_meta(meta_path: Path, bin_path: Path) -> TokenFile:
    meta = json.loads(meta_path.read_text())
    datasets = tuple(DatasetTokens(**d) for d in meta["datasets"])
    return TokenFile(path=bin_path, key=meta["key"], dtype=meta["dtype"], datasets=datasets)


def _write_dataset(tokenizer: PreTrainedTokenizerBase, path: Path, expected: bytes, out: object, dtype: str,
                   piece_chars: int, batch_chars: int) -> DatasetTokens:
    num_chars = num_tokens = num_documents = 0
    for ids, chars, documents in _token_batches(tokenizer, stream_verified(path, expected, piece_chars),
                                                batch_chars):
        ids.astype(dtype).tofile(out)  # type: ignore[arg-type]
        num_chars, num_tokens, num_documents = num_chars + chars, num_tokens + len(ids), num_documents + documents
    return DatasetTokens(to_hex(expected), num_chars, num_tokens, num_documents)


def _token_batches(tokenizer: PreTrainedTokenizerBase, pieces: Iterator[TextPiece],
                   batch_chars: int) -> Iterator[tuple[np.ndarray, int, int]]:
    """(token ids, characters, documents started) per batch of about `batch_chars` characters."""
    batch: list[TextPiece] = []
    started: set[int] = set()  # documents with text seen (a blank file is skipped, as before)
    size = 0
    for piece in pieces:
        batch.append(piece)
        size += len(piece.text)
        if size >= batch_chars:
            yield _encode(tokenizer, batch, started)
            batch, size = [], 0
    if batch:
        yield _encode(tokenizer, batch, started)


def _encode(tokenizer: PreTrainedTokenizerBase, batch: list[TextPiece],
            started: set[int]) -> tuple[np.ndarray, int, int]:
    encoded = tokenizer([p.text for p in batch], add_special_tokens=False)["input_ids"]
    out: list[int] = []
    num_started = 0
    for piece, ids in zip(batch, encoded, strict=True):
        if piece.document not in started:
            if not piece.text.strip():
                continue
            started.add(piece.document)
            num_started += 1
            out += [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        out += ids
        if piece.is_last and tokenizer.eos_token_id is not None:
            out.append(tokenizer.eos_token_id)
    return np.asarray(out, dtype=np.int64), sum(len(p.text) for p in batch), num_started
