"""Registered datasets as files: fetched from their URI, checked against the registered content hash,
and read as texts (for training adapters now, and for attribution evidence later)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlparse

import httpx

from node.errors import AdapterSourceError, BadRequest
from node.lora.content_hash import dataset_content_hash
from node.protocol.hexstr import to_hex

TEXT_SUFFIXES = (".txt", ".md", ".jsonl", ".json", ".csv")
MAX_DATASET_BYTES = 1 << 30


def local_path(uri: str) -> Path | None:
    """The local path a file:// URI or a plain path names; None for http(s)."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme in ("", None) or len(parsed.scheme) == 1:  # a plain path (or a Windows drive)
        return Path(uri)
    return None


def fetch_dataset(uri: str, expected_hash: bytes, cache_dir: Path) -> Path:
    """The dataset at `uri`, verified: a local one is used where it is, an http(s) file is downloaded."""
    path = local_path(uri)
    if path is None:
        path = _download(uri, cache_dir / to_hex(expected_hash)[2:18])
    if not path.exists():
        raise AdapterSourceError(f"dataset not found at {uri}", uri=uri)
    actual = dataset_content_hash(path)
    if actual != expected_hash:
        raise BadRequest("the dataset's content does not match its registered hash", uri=uri,
                         registered=to_hex(expected_hash), actual=to_hex(actual))
    return path


def _download(uri: str, dest: Path) -> Path:
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    size = 0
    with tempfile.NamedTemporaryFile(dir=dest.parent, delete=False) as tmp:
        try:
            with httpx.stream("GET", uri, timeout=30.0, follow_redirects=True) as resp:
                resp.raise_for_status()
                for chunk in resp.iter_bytes(1 << 20):
                    size += len(chunk)
                    if size > MAX_DATASET_BYTES:
                        raise AdapterSourceError("dataset larger than the limit", uri=uri, limit=MAX_DATASET_BYTES)
                    tmp.write(chunk)
        except httpx.HTTPError as exc:
            Path(tmp.name).unlink(missing_ok=True)
            raise AdapterSourceError(f"cannot fetch dataset {uri}", reason=str(exc)) from exc
    shutil.move(tmp.name, dest)
    return dest


def read_texts(path: Path) -> list[str]:
    """A file's text, or the texts of a folder's text files in path order."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES)
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    return [t for t in texts if t.strip()]
