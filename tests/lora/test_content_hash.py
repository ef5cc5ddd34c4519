"""The registry hash rules: byte layout, what each hash covers, and what changes it."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from node.errors import AdapterFormatError, ModelFormatError
from node.lora.content_hash import (
    adapter_weights_sha256,
    base_model_id,
    dataset_content_hash,
    file_sha256,
    folder_sha256,
    sha256_from_hex,
)
from node.protocol.hexstr import to_hex


def _write(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def _expected(files: dict[str, bytes]) -> bytes:
    """The documented layout, spelt out independently of the implementation."""
    digest = hashlib.sha256()
    for name in sorted(files, key=lambda n: n.encode()):
        digest.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    return digest.digest()


def test_folder_rule_matches_the_documented_byte_layout(tmp_path: Path) -> None:
    files = {"b.txt": b"bee", "a/z.json": b"{}", "a/b c.bin": b"\x00" * 10, "é.txt": b"accent"}
    _write(tmp_path, files)
    assert folder_sha256(tmp_path) == _expected(files)
    assert dataset_content_hash(tmp_path) == _expected(files)


def test_folder_rule_is_frozen_by_a_golden_vector(tmp_path: Path) -> None:
    # If this changes, every registered dataset and adapter hash on chain stops matching.
    _write(tmp_path, {"adapter_config.json": b'{"r": 8}', "adapter_model.safetensors": b"weights"})
    assert to_hex(adapter_weights_sha256(tmp_path)) == (
        "0x3e474aaa0bb61335b97052f8ee5525cc13b7a84aa324954821c51c091d3923d0")


def test_file_hash_streams_large_files(tmp_path: Path) -> None:
    data = os.urandom(3 * (1 << 20) + 12345)  # spans several 1 MiB chunks and a partial one
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    assert file_sha256(path) == hashlib.sha256(data).digest()
    assert dataset_content_hash(path) == hashlib.sha256(data).digest()


def test_order_of_creation_does_not_matter_but_names_and_bytes_do(tmp_path: Path) -> None:
    one = _write(tmp_path / "one", {"x": b"1", "y": b"2"})
    two = _write(tmp_path / "two", {"y": b"2", "x": b"1"})
    assert folder_sha256(one) == folder_sha256(two)
    (two / "y").write_bytes(b"3")
    assert folder_sha256(one) != folder_sha256(two)
    (two / "y").write_bytes(b"2")
    (two / "y").rename(two / "w")
    assert folder_sha256(one) != folder_sha256(two)


def test_path_and_content_cannot_be_shifted_between_files(tmp_path: Path) -> None:
    # "ab" + "c" vs "a" + "bc": the NUL separator and fixed-size digests keep the layout unambiguous.
    one = _write(tmp_path / "one", {"ab": b"c"})
    two = _write(tmp_path / "two", {"a": b"bc"})
    assert folder_sha256(one) != folder_sha256(two)


def test_adapter_hash_covers_exactly_config_and_weights(tmp_path: Path) -> None:
    folder = _write(tmp_path, {"adapter_config.json": b"{}", "adapter_model.safetensors": b"w"})
    before = adapter_weights_sha256(folder)
    (folder / "README.md").write_text("notes")
    assert adapter_weights_sha256(folder) == before
    (folder / "adapter_config.json").write_bytes(b'{"r": 1}')
    assert adapter_weights_sha256(folder) != before


def test_adapter_hash_names_the_missing_file(tmp_path: Path) -> None:
    _write(tmp_path, {"adapter_config.json": b"{}", "adapter_model.bin": b"pickle"})
    with pytest.raises(AdapterFormatError, match=r"adapter_model\.safetensors"):
        adapter_weights_sha256(tmp_path)


def test_base_model_id_covers_config_shards_and_index_only(tmp_path: Path) -> None:
    files = {"config.json": b"{}", "model-00001-of-00002.safetensors": b"s1",
             "model-00002-of-00002.safetensors": b"s2", "model.safetensors.index.json": b"{}"}
    _write(tmp_path, files)
    assert base_model_id(tmp_path) == _expected(files)
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "generation_config.json").write_text("{}")
    assert base_model_id(tmp_path) == _expected(files)
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"s2'")
    assert base_model_id(tmp_path) != _expected(files)


def test_base_model_id_needs_config_and_safetensors(tmp_path: Path) -> None:
    _write(tmp_path, {"config.json": b"{}", "pytorch_model.bin": b"pickle"})
    with pytest.raises(ModelFormatError, match="safetensors"):
        base_model_id(tmp_path)
    (tmp_path / "config.json").unlink()
    (tmp_path / "model.safetensors").write_bytes(b"w")
    with pytest.raises(ModelFormatError, match=r"config\.json"):
        base_model_id(tmp_path)


def test_symlinked_files_count_like_files(tmp_path: Path) -> None:
    # A Hugging Face cache snapshot is a folder of symlinks into a blob store.
    blobs = _write(tmp_path / "blobs", {"1": b"{}", "2": b"weights"})
    snap = tmp_path / "snapshot"
    snap.mkdir()
    (snap / "config.json").symlink_to(blobs / "1")
    (snap / "model.safetensors").symlink_to(blobs / "2")
    assert base_model_id(snap) == _expected({"config.json": b"{}", "model.safetensors": b"weights"})


def test_hex_round_trip() -> None:
    digest = hashlib.sha256(b"x").digest()
    assert sha256_from_hex(to_hex(digest)) == digest
    assert sha256_from_hex(digest.hex().upper()) == digest
    with pytest.raises(ValueError):
        sha256_from_hex("0x1234")
