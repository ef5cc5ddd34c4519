"""A registered dataset read as a stream of text pieces, its content hash checked on the bytes read.

The hash is computed over the very bytes that are tokenized (one read, no window between a check and
the use), with the rule of `node.lora.content_hash`: a file's sha256, or the folder rule over every
regular file (the non-text ones are hashed without being read as text). A mismatch raises once the
stream is consumed, so a caller writes what it derives to a temporary place and keeps it only then.
"""

from __future__ import annotations

import codecs
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from node.errors import BadRequest
from node.lora.content_hash import CHUNK_BYTES, dataset_files, file_sha256, folder_digest
from node.protocol.hexstr import to_hex

TEXT_SUFFIXES = (".txt", ".md", ".jsonl", ".json", ".csv")
PIECE_CHARS = 1 << 16


@dataclass(frozen=True)
class TextPiece:
    """Up to about `PIECE_CHARS` characters of one document, cut after a newline where there is one."""

    text: str
    document: int  # which file of the dataset it comes from (its index in the folder rule's order)
    is_last: bool  # the document's last piece


def text_files(root: Path) -> list[str]:
    """A folder dataset's text files in the order they are trained on (relative paths, sorted)."""
    return [name for name in dataset_files(root) if Path(name).suffix in TEXT_SUFFIXES]


def stream_verified(root: Path, expected_hash: bytes, piece_chars: int = PIECE_CHARS) -> Iterator[TextPiece]:
    """Every text piece of the dataset at `root`; raises BadRequest at the end if its hash is not `expected_hash`."""
    if root.is_file():
        digest = hashlib.sha256()
        yield from _pieces(root, 0, digest, piece_chars)
        actual = digest.digest()
    else:
        digests: list[tuple[str, bytes]] = []
        texts = set(text_files(root))
        for name in dataset_files(root):
            if name not in texts:
                digests.append((name, file_sha256(root / name)))
                continue
            digest = hashlib.sha256()
            yield from _pieces(root / name, len(digests), digest, piece_chars)
            digests.append((name, digest.digest()))
        actual = folder_digest(digests)
    if actual != expected_hash:
        raise BadRequest("the dataset's content does not match its registered hash", path=str(root),
                         registered=to_hex(expected_hash), actual=to_hex(actual))


def _pieces(path: Path, document: int, digest: hashlib._Hash, piece_chars: int) -> Iterator[TextPiece]:
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pending = ""
    with open(path, "rb") as f:
        while block := f.read(min(CHUNK_BYTES, 4 * piece_chars)):
            digest.update(block)
            pending += decoder.decode(block)
            while len(pending) >= piece_chars:
                cut = pending.rfind("\n", 0, piece_chars) + 1 or piece_chars
                yield TextPiece(pending[:cut], document, is_last=False)
                pending = pending[cut:]
    yield TextPiece(pending + decoder.decode(b"", final=True), document, is_last=True)
