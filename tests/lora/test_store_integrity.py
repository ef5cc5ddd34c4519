"""The load path's trust: the registered hash is checked when a copy enters the disk cache, which only
ever holds verified bytes; loads from it are trusted, unless `verify_every_load` asks for a hash each time."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import pytest
import torch

from node.errors import AdapterIntegrityError
from node.lora import adapter_files
from node.lora.provider import AdapterSource, LoadState
from tests.fixtures.adapters import make_adapter, parse_adapter
from tests.lora.test_store import _add, _key, _same, _store


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _cached_weights(tmp_path: Path, name: str) -> Path:
    return tmp_path / "cache" / _key(tmp_path, name) / "adapter_model.safetensors"


def test_a_disk_copy_gone_bad_is_deleted_and_fetched_again_when_every_load_is_verified(tmp_path: Path) -> None:
    with _store(tmp_path, num_host=1, verify_every_load=True) as store:
        folder = _add(store, tmp_path, "a")
        _add(store, tmp_path, "b", seed=1)
        store.get("a")
        store.get("b")  # pushes a out of host memory
        _flip_last_byte(_cached_weights(tmp_path, "a"))
        assert _same(store.get("a"), folder)
        m = store.metrics()
        assert (m.source.hits, m.disk.hits) == (3, 0)


def test_loads_from_the_disk_cache_are_not_hashed_by_default(tmp_path: Path) -> None:
    """The decision: the hash is paid once, when the copy enters the cache, not on every load."""
    with _store(tmp_path, num_host=1) as store:
        _add(store, tmp_path, "a")
        _add(store, tmp_path, "b", seed=1)
        store.get("a")
        store.get("b")  # pushes a out of host memory
        with mock.patch.object(adapter_files, "adapter_files_sha256", side_effect=AssertionError("hashed")):
            weights = store.get("a")  # from the disk cache, unhashed
        assert _same(weights, _cached_weights(tmp_path, "a").parent)
        m = store.metrics()
        assert (m.source.hits, m.disk.hits) == (2, 1)


def test_a_disk_copy_whose_header_broke_is_fetched_again(tmp_path: Path) -> None:
    with _store(tmp_path, num_host=1) as store:
        folder = _add(store, tmp_path, "a")
        _add(store, tmp_path, "b", seed=1)
        store.get("a")
        store.get("b")
        cached = _cached_weights(tmp_path, "a")
        cached.write_bytes(cached.read_bytes()[:-5])  # truncated: the header no longer fits the file
        assert _same(store.get("a"), folder)
        assert store.metrics().source.hits == 3


@pytest.mark.parametrize("tamper", ["weights", "config"])
def test_a_source_serving_other_bytes_never_reaches_the_cache(tmp_path: Path, tamper: str) -> None:
    """An attacker who controls the source can make a load fail, never make the node serve (or cache)
    bytes other than the registered ones; the failure is reported with both hashes."""
    folder = tmp_path / "src" / "a"
    registered = make_adapter(folder)
    if tamper == "weights":
        _flip_last_byte(folder / "adapter_model.safetensors")
    else:
        (folder / "adapter_config.json").write_text((folder / "adapter_config.json").read_text() + " ")
    with _store(tmp_path) as store:
        store.register("a", AdapterSource(str(folder), registered))
        with pytest.raises(AdapterIntegrityError) as caught:
            store.get("a")
        assert caught.value.facts["expected"] == registered
        assert store.state("a") is LoadState.FAILED and store.metrics().source.misses == 1
        assert store.disk_keys() == [] and list((tmp_path / "cache" / ".tmp").iterdir()) == []
        make_adapter(folder)  # the source mends: the next try serves the registered bytes
        assert _same(store.get("a"), folder)
        assert len(store.disk_keys()) == 1


def test_trusted_and_verified_loads_parse_the_same_weights(tmp_path: Path) -> None:
    folder = tmp_path / "src" / "a"
    make_adapter(folder, seed=3)
    whole = adapter_files.AdapterFiles.read(folder)
    opened = adapter_files.AdapterFiles.open(folder)
    assert opened.weights is None and opened.header == whole.header and opened.size == whole.size
    assert parse_adapter(opened).keys() == parse_adapter(whole).keys()
    plan = adapter_files.GatherPlan.of([((v.begin, v.end), 16, (v.begin, v.end)) for v in whole.header.values()])
    gathered = opened.gather(plan)
    assert torch.equal(gathered, whole.gather(plan)) and gathered.numel() == plan.nbytes
    begin, end = plan.bounds[0]
    entry = next(iter(whole.header.values()))
    assert bytes(gathered[begin:end].numpy()) == (
        bytes(whole.data[entry.begin:entry.end]) + bytes(16) + bytes(whole.data[entry.begin:entry.end]))


def test_a_disk_copy_loaded_once_is_loaded_again_reading_only_its_tensors(tmp_path: Path) -> None:
    with _store(tmp_path, num_host=1) as store:
        folder = _add(store, tmp_path, "a")
        (folder / "chat_template.jinja").write_text("{{ first }}")
        _add(store, tmp_path, "b", seed=1)
        store.get("a")
        store.get("b")  # pushes a out of host memory
        with mock.patch.object(adapter_files.AdapterFiles, "open", side_effect=AssertionError("opened")), \
                mock.patch.object(adapter_files, "read_chat_template", side_effect=AssertionError("read")):
            assert _same(store.get("a"), folder)  # config, header and template as its first load read them
        assert store.chat_template("a") == "{{ first }}"
        (folder / "chat_template.jinja").write_text("{{ second }}")
        store.get("b")
        cached = _cached_weights(tmp_path, "a")
        cached.write_bytes(cached.read_bytes()[:-5])  # gone bad: fetched again, with the source's template now
        assert _same(store.get("a"), folder)
        assert store.chat_template("a") == "{{ second }}" and store.metrics().source.hits == 3
