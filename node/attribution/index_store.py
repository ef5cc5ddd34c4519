"""Span indexes on disk: built once per (dataset content hash, tokenizer), loaded lazily by mmap.

    <root>/<content hash>-<tokenizer id>/tokens.npy   the token stream (see span_index.py)
                                         suffixes.npy its suffix array
                                         meta.json    format version, sizes, tokenizer, build time

A folder is written under a temporary name and renamed into place, so a reader never sees half of
one and two builders of the same dataset cannot mix their files (the second rename loses and its
folder is dropped). Datasets are fetched from their registered URI and checked against their
registered content hash before anything is built (node/attribution/dataset_files.py).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from node.attribution.dataset_files import fetch_dataset, read_texts
from node.attribution.span_index import SpanIndex, build_suffix_array, separator_for
from node.attribution.token_rule import Tokenizer, text_ids, tokenizer_id
from node.protocol.hexstr import from_hex

log = logging.getLogger(__name__)
FORMAT_VERSION = 1


@dataclass(frozen=True)
class DatasetRef:
    """A registered dataset as the registry has it (plain values: no database row)."""

    dataset_id: int
    content_hash: str  # 0x-hex sha256 (the folder rule for folders)
    uri: str


@dataclass(frozen=True)
class IndexInfo:
    num_tokens: int
    num_texts: int
    nbytes: int
    build_s: float  # all of it: fetch and hash check, tokenize, suffix sort, write
    tokenize_s: float
    sort_s: float


def build_stream(texts: list[str], tokenizer: Tokenizer) -> np.ndarray:
    """Every text's token ids followed by the separator, as one array."""
    dtype, separator = separator_for(len(tokenizer))
    parts: list[np.ndarray] = []
    for text in texts:
        parts.extend(text_ids(tokenizer, text, dtype))
        parts.append(np.array([separator], dtype=dtype))
    return np.concatenate(parts) if parts else np.zeros(0, dtype)


class IndexStore:
    """The node's (or a verifier's) span indexes under `root`; thread-safe."""

    def __init__(self, root: Path, tokenizer: Tokenizer) -> None:
        self.root = root
        self.tokenizer = tokenizer
        self.tokenizer_id = tokenizer_id(tokenizer)
        self._loaded: dict[str, SpanIndex] = {}
        self._lock = threading.Lock()

    def folder(self, dataset: DatasetRef) -> Path:
        return self.root / f"{dataset.content_hash.lower().removeprefix('0x')}-{self.tokenizer_id[2:18]}"

    def is_built(self, dataset: DatasetRef) -> bool:
        """Its index is on disk in this format (an index of an older format is built again)."""
        meta = self.folder(dataset) / "meta.json"
        return meta.exists() and json.loads(meta.read_text()).get("format") == FORMAT_VERSION

    def get(self, dataset: DatasetRef) -> SpanIndex:
        """The dataset's index: from memory, from disk (mmap), or fetched, verified and built now."""
        key = self.folder(dataset).name
        with self._lock:
            index = self._loaded.get(key)
        if index is not None:
            return index
        if not self.is_built(dataset):
            shutil.rmtree(self.folder(dataset), ignore_errors=True)
            self.build(dataset)
        index = _load(self.folder(dataset))
        with self._lock:
            return self._loaded.setdefault(key, index)

    def build(self, dataset: DatasetRef) -> IndexInfo:
        """Fetch the dataset, check its content hash, tokenize it and write its index."""
        started = time.perf_counter()
        path = fetch_dataset(dataset.uri, from_hex(dataset.content_hash),
                             self.root / "datasets")
        texts = read_texts(path)
        tokenizing = time.perf_counter()
        tokens = build_stream(texts, self.tokenizer)
        sorting = time.perf_counter()
        suffixes = build_suffix_array(tokens)
        sorted_at = time.perf_counter()
        info = IndexInfo(int(tokens.size), len(texts), int(tokens.nbytes + suffixes.nbytes), 0.0,
                         sorting - tokenizing, sorted_at - sorting)
        meta = {"format": FORMAT_VERSION, "datasetId": dataset.dataset_id, "contentHash": dataset.content_hash,
                "tokenizer": self.tokenizer_id, "numTokens": info.num_tokens, "numTexts": info.num_texts,
                "tokenizeSeconds": round(info.tokenize_s, 3), "sortSeconds": round(info.sort_s, 3)}
        _write_atomically(self.folder(dataset), tokens, suffixes, meta)
        info = replace(info, build_s=time.perf_counter() - started)
        log.info("span index of dataset %d built: %d tokens, %d bytes, %.1f s", dataset.dataset_id,
                 info.num_tokens, info.nbytes, info.build_s)
        return info


def _write_atomically(dest: Path, tokens: np.ndarray, suffixes: np.ndarray, meta: dict[str, Any]) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        np.save(tmp / "tokens.npy", tokens)
        np.save(tmp / "suffixes.npy", suffixes)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        for name in ("tokens.npy", "suffixes.npy", "meta.json"):
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        try:
            tmp.rename(dest)
        except OSError:  # another builder got there first: its index is the same
            if not (dest / "meta.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load(folder: Path) -> SpanIndex:
    return SpanIndex(np.load(folder / "tokens.npy", mmap_mode="r"), np.load(folder / "suffixes.npy", mmap_mode="r"))
