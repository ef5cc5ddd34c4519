"""The content hashes the registries store: one rule, used by the CLI that registers and the node that loads.

The folder rule (`folder_sha256`), byte for byte:

    digest = sha256()
    for path in sorted(paths, key=utf8_bytes):      # relative paths, "/"-separated, no leading "./"
        digest.update(utf8_bytes(path))
        digest.update(b"\\0")
        digest.update(sha256(file_bytes(path)))     # the raw 32-byte digest, not hex
    return digest.digest()                          # 32 bytes

Paths sort by their UTF-8 bytes (the same order as Python's `sorted` on str). Symlinks to files are
followed (a Hugging Face cache snapshot is a folder of symlinks); symlinked folders are not walked.
Empty folders contribute nothing. Every file is read in 1 MiB chunks, never whole.

What each registry hash covers:
- dataset `contentHash` (`dataset_content_hash`): a file's plain sha256; a folder's rule over all of
  its regular files, recursively.
- adapter `weightsSha256` (`adapter_weights_sha256`): the rule over exactly `adapter_config.json` and
  `adapter_model.safetensors` (other files in the folder, a README for example, are not covered).
- base model id (`base_model_id`): the rule over `config.json`, every top-level `*.safetensors` file
  (all shards) and every `*.safetensors.index.json`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

from node.errors import AdapterFormatError, ModelFormatError
from node.protocol.hexstr import from_hex

CHUNK_BYTES = 1 << 20
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
MODEL_CONFIG = "config.json"


def file_sha256(path: Path | str) -> bytes:
    """The 32-byte sha256 of a file, streamed in 1 MiB chunks."""
    digest = hashlib.sha256()
    buffer = bytearray(CHUNK_BYTES)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.digest()


def folder_digest(file_digests: Iterable[tuple[str, bytes]]) -> bytes:
    """The folder rule over (relative path, 32-byte file sha256) pairs, in any order."""
    pairs = sorted(file_digests, key=lambda p: p[0].encode("utf-8"))
    digest = hashlib.sha256()
    for i, (name, file_digest) in enumerate(pairs):
        if i and pairs[i - 1][0] == name:
            raise ValueError(f"duplicate path {name!r} in the folder rule")
        assert len(file_digest) == 32, "a file digest is a raw 32-byte sha256"
        digest.update(name.encode("utf-8"))
        digest.update(b"\0")
        digest.update(file_digest)
    return digest.digest()


def folder_sha256(folder: Path | str, names: Iterable[str] | None = None) -> bytes:
    """The folder rule over `names` (relative "/"-separated paths), or over all regular files if None.

    A name that is missing raises FileNotFoundError.
    """
    root = Path(folder)
    if not root.is_dir():
        raise NotADirectoryError(f"not a folder: {root}")
    selected = sorted(set(names)) if names is not None else _all_files(root)
    return folder_digest((name, file_sha256(root / name)) for name in selected)


def dataset_content_hash(path: Path | str) -> bytes:
    """A dataset's `contentHash`: sha256 of a file, or the folder rule over every regular file."""
    p = Path(path)
    if p.is_file():
        return file_sha256(p)
    return folder_sha256(p)


def adapter_weights_sha256(folder: Path | str) -> bytes:
    """An adapter's `weightsSha256`: the folder rule over its config and its safetensors weights."""
    root = Path(folder)
    missing = [name for name in ADAPTER_FILES if not (root / name).is_file()]
    if missing:
        raise AdapterFormatError(f"adapter folder {root} lacks {', '.join(missing)}", folder=str(root),
                                 missing=missing)
    return folder_sha256(root, ADAPTER_FILES)


def adapter_files_sha256(config: bytes | bytearray, weights: bytes | bytearray) -> bytes:
    """`adapter_weights_sha256` of a folder whose two files hold these bytes (already in memory).

    The store hashes what it has read once for parsing, so the bytes it checks are the bytes it parses.
    """
    digests = [(name, hashlib.sha256(memoryview(data)).digest())
               for name, data in zip(ADAPTER_FILES, (config, weights), strict=True)]
    return folder_digest(digests)


def base_model_names(folder: Path | str) -> list[str]:
    """The files a base model id covers: config.json, the safetensors shards and their index."""
    root = Path(folder)
    names = sorted(p.name for p in root.iterdir()
                   if p.is_file() and (p.name.endswith(".safetensors")
                                       or p.name.endswith(".safetensors.index.json")))
    if not (root / MODEL_CONFIG).is_file():
        raise ModelFormatError(f"model folder {root} has no {MODEL_CONFIG}", folder=str(root))
    if not any(n.endswith(".safetensors") for n in names):
        raise ModelFormatError(f"model folder {root} has no *.safetensors weights", folder=str(root))
    return [MODEL_CONFIG, *names]


def base_model_id(folder: Path | str) -> bytes:
    """The base model id an adapter is registered for (`loranode model id DIR` prints it)."""
    return folder_sha256(folder, base_model_names(folder))


def sha256_from_hex(text: str) -> bytes:
    """A 32-byte digest from 0x-hex or bare hex (any case); ValueError otherwise."""
    raw = from_hex(text)
    if len(raw) != 32:
        raise ValueError(f"a sha256 is 64 hex digits, got {2 * len(raw)}: {text!r}")
    return raw


def dataset_files(folder: Path | str) -> list[str]:
    """The files a folder dataset's `contentHash` covers: every regular file, as sorted relative paths."""
    return sorted(_all_files(Path(folder)), key=lambda name: name.encode("utf-8"))


def _all_files(root: Path) -> list[str]:
    names: list[str] = []
    for dirpath, _dirnames, filenames in os.walk(root, followlinks=False):
        base = Path(dirpath).relative_to(root)
        for filename in filenames:
            if (Path(dirpath) / filename).is_file():
                names.append((base / filename).as_posix())
    return names
