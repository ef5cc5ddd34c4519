"""The load path's trust: the registered hash is checked when a copy enters the disk cache, which only
ever holds verified bytes; loads from it are trusted, unless `verify_every_load` asks for a hash each time."""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch

from node.errors import AdapterFormatError, AdapterIntegrityError, AdapterSourceError
from node.lora import adapter_files
from node.lora.adapter import LoRATargetSpec, LoRAWeights, load_lora_adapter
from node.lora.disk_cache import VETTED_FILE
from node.lora.provider import AdapterSource, LoadState
from node.lora.store import AdapterStore, StoreConfig
from tests.fixtures.adapters import make_adapter, parse_adapter
from tests.lora.test_store import _add, _disk_size, _key, _same, _store


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


TARGET = LoRATargetSpec.of(2, {m: (64, 64) for m in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                     "up_proj", "down_proj")})  # make_adapter's shapes


def _lora_store(tmp_path: Path, num_disk: int = 100, **overrides: Any) -> AdapterStore[LoRAWeights]:
    """A store parsing as the engine does (the LoRA parser, with its finiteness check), host memory
    for one adapter."""
    parse = functools.partial(load_lora_adapter, target=TARGET, max_rank=8)
    config = StoreConfig(cache_dir=tmp_path / "cache", max_host_bytes=16_000,
                         max_disk_bytes=num_disk * _disk_size(tmp_path),
                         retry_after_s=0.0, **overrides)
    return AdapterStore(config, parse, lambda w: w.nbytes)


def _poison(path: Path) -> None:
    """Overwrite the last tensor's bytes with NaN, in place: same size, header intact."""
    data = bytearray(path.read_bytes())
    last = max(adapter_files.parse_safetensors_header(path.name, data).values(), key=lambda e: e.end)
    data[last.begin:last.end] = torch.full(((last.end - last.begin) // 4,), float("nan")).numpy().tobytes()
    path.write_bytes(bytes(data))


def _finite(weights: LoRAWeights) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in (*weights.a.values(), *weights.scaled_b().values()))


def test_a_cache_entry_tampered_after_it_was_written_is_refused_when_every_load_is_verified(tmp_path: Path) -> None:
    with _lora_store(tmp_path, verify_every_load=True) as store:
        folder = _add(store, tmp_path, "a")
        _add(store, tmp_path, "b", seed=1)
        good = store.get("a")
        store.get("b")  # pushes a out of host memory
        _poison(_cached_weights(tmp_path, "a"))
        weights = store.get("a")  # the tampered copy hashes wrong: deleted, fetched again from the source
        assert _finite(weights) and all(torch.equal(weights.b[m], good.b[m]) for m in good.b)
        assert store.metrics().source.hits == 3
        store.get("b")
        _poison(_cached_weights(tmp_path, "a"))
        shutil.rmtree(folder)  # and now the source is gone too: the load fails, nothing is served
        with pytest.raises(AdapterSourceError):
            store.get("a")
        assert store.state("a") is LoadState.FAILED and store.host_ids() == ["b"]


def test_the_trusted_cache_checks_an_entry_once_and_refuses_one_poisoned_before_its_first_load(
        tmp_path: Path) -> None:
    """The decided trade-off, without verify_every_load: an entry's weights are checked finite by its
    first load (which vets it, a mark kept on disk); a change made after that, by whoever can write the
    cache directory, is served as it is, in this process and after a restart. One made before is refused."""
    with _lora_store(tmp_path) as store:
        _add(store, tmp_path, "a")
        _add(store, tmp_path, "b", seed=1)
        store.get("a")  # fetched, checked, vetted
        store.get("b")
        assert (_cached_weights(tmp_path, "a").parent / VETTED_FILE).is_file()
        _poison(_cached_weights(tmp_path, "a"))
        assert not _finite(store.get("a"))  # trusted: served unchecked
    with _lora_store(tmp_path) as store:  # a restart: the marks are read back
        _add(store, tmp_path, "a")
        assert not _finite(store.get("a")) and store.metrics().source.hits == 0
        _add(store, tmp_path, "c", seed=2)
        store.get("c")  # c's first load fetches it, checks it and vets it
        store.get("a")
        cached_c = _cached_weights(tmp_path, "c")
        (cached_c.parent / VETTED_FILE).unlink()  # as if fetched by a node that has never loaded it
    with _lora_store(tmp_path) as store:
        _add(store, tmp_path, "c", seed=2)
        _poison(cached_c)
        with pytest.raises(AdapterFormatError, match="NaN or Inf"):
            store.get("c")  # not vetted: checked, refused before it is served
        assert store.state("c") is LoadState.FAILED


def _open_in(folder: Path) -> list[str]:
    """Files this process holds open under `folder` (Linux: /proc/self/fd)."""
    links = (os.readlink(fd) for fd in Path("/proc/self/fd").iterdir() if fd.is_symlink())
    return [link for link in links if link.startswith(str(folder))]


def test_an_entry_s_weights_file_stays_open_while_it_is_cached_and_is_closed_with_it(tmp_path: Path) -> None:
    with _lora_store(tmp_path, num_disk=2) as store:
        for name, seed in (("a", 0), ("b", 1), ("c", 2)):
            _add(store, tmp_path, name, seed=seed)
        store.get("a")
        store.get("b")
        assert len(_open_in(tmp_path / "cache")) == 2  # a's and b's, read by their next loads
        with mock.patch.object(adapter_files.os, "open", side_effect=AssertionError("opened")):
            assert _finite(store.get("a"))  # through its open file: no path looked up
        store.get("c")  # pushes b out of the disk cache: its file is closed
        assert sorted(_open_in(tmp_path / "cache")) == sorted(
            str(_cached_weights(tmp_path, name)) for name in ("a", "c"))
    assert _open_in(tmp_path / "cache") == []  # closed with the store


def test_a_cached_file_truncated_while_its_adapter_is_loaded_never_takes_the_process_down(tmp_path: Path) -> None:
    """Host memory holds a copy of the bytes (never a memory map of the cached file, which would turn a
    truncation behind the node's back into SIGBUS): the adapter in host memory is served as it was read,
    and its next load from the disk cache finds the file cut short and fetches it again."""
    with _lora_store(tmp_path) as store:
        _add(store, tmp_path, "a")
        _add(store, tmp_path, "b", seed=1)
        before = store.get("a")  # in host memory, its weights file kept open by the disk cache
        cached = _cached_weights(tmp_path, "a")
        os.truncate(cached, cached.stat().st_size // 2)
        held = store.get("a")
        assert held is before and _finite(held) and float(held.a["qkv"].abs().sum()) > 0
        store.get("b")  # pushes a out of host memory
        again = store.get("a")
        assert all(torch.equal(again.a[g], before.a[g]) for g in before.a)
        assert store.metrics().source.hits == 3
