"""How texts become the token ids that evidence is computed on: one rule, used by the node and by
anyone who recomputes a receipt's evidence.

- An output is tokenized whole, without special tokens.
- A dataset text is cut into chunks of at most CHUNK_CHARS characters, each ending at the last line
  break inside the limit (else the last space, else at the limit), and each chunk is tokenized
  without special tokens; the chunks' ids are concatenated. (Whole-file tokenization of a 100 MB
  text would hold every id as a Python int at once; chunks keep memory flat and batch well.)

A tokenizer is named by `tokenizer_id`: the sha256 of its model, normalizer, pre-tokenizer and added
tokens, so that evidence computed with another tokenizer is never mistaken for this one's.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np

CHUNK_CHARS = 1 << 16
BATCH_CHUNKS = 64


class Tokenizer(Protocol):
    """The part of a Hugging Face tokenizer this package uses."""

    def __call__(self, text: Any, add_special_tokens: bool = ...) -> Any: ...

    def decode(self, token_ids: list[int], /) -> str | list[str]:
        """A flat list of ids decodes to one str (a batch, to a list of them)."""
        ...

    def __len__(self) -> int: ...


def output_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def chunks(text: str, limit: int = CHUNK_CHARS) -> Iterator[str]:
    """`text` cut into pieces of at most `limit` characters at line breaks (else spaces)."""
    start = 0
    while len(text) - start > limit:
        window = text[start:start + limit]
        cut = window.rfind("\n") + 1 or window.rfind(" ") + 1 or limit
        yield window[:cut]
        start += cut
    if start < len(text):
        yield text[start:]


def text_ids(tokenizer: Tokenizer, text: str, dtype: np.dtype[Any]) -> Iterator[np.ndarray]:
    """The token ids of one dataset text, as arrays of `dtype`, batch by batch."""
    batch: list[str] = []
    for piece in chunks(text):
        batch.append(piece)
        if len(batch) == BATCH_CHUNKS:
            yield _encode(tokenizer, batch, dtype)
            batch = []
    if batch:
        yield _encode(tokenizer, batch, dtype)


def _encode(tokenizer: Tokenizer, batch: list[str], dtype: np.dtype[Any]) -> np.ndarray:
    ids = tokenizer(batch, add_special_tokens=False)["input_ids"]
    return np.concatenate([np.asarray(x, dtype=dtype) for x in ids]) if ids else np.zeros(0, dtype)


def tokenizer_id(tokenizer: Any) -> str:
    """0x-sha256 naming the tokenizer's behaviour (not its padding or truncation settings)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        material: Any = {k: spec.get(k) for k in ("model", "normalizer", "pre_tokenizer", "added_tokens")}
    else:
        material = sorted(tokenizer.get_vocab().items())
    return "0x" + hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()
