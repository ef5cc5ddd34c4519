"""The tiered store: what each tier holds, in which order it lets go, and what it refuses."""

from __future__ import annotations

import gc
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from node.errors import (
    AdapterFormatError,
    AdapterIntegrityError,
    AdapterNotFound,
    AdapterSourceError,
    AdapterTooLarge,
    ConfigError,
)
from node.lora.adapter_files import AdapterFiles
from node.lora.content_hash import ADAPTER_FILES, adapter_weights_sha256
from node.lora.disk_cache import disk_key
from node.lora.provider import AdapterSource, LoadState
from node.lora.store import AdapterStore, StoreConfig
from node.protocol.hexstr import to_hex
from tests.fixtures.adapters import adapter_nbytes, make_adapter, parse_adapter

HOST_BYTES = 8192  # one default test adapter in host memory: 2 layers x (q, v) x (A + B), rank 4, f32


def _store(tmp_path: Path, *, num_host: float = 100, num_disk: float = 100,
           parse: Callable[[AdapterFiles], Any] = parse_adapter, **overrides: Any) -> AdapterStore[Any]:
    disk_size = _disk_size(tmp_path)
    config = StoreConfig(cache_dir=tmp_path / "cache", max_host_bytes=int(num_host * HOST_BYTES),
                         max_disk_bytes=int(num_disk * disk_size), **{"retry_after_s": 0.0, **overrides})
    return AdapterStore(config, parse, adapter_nbytes)


def _disk_size(tmp_path: Path) -> int:
    probe = tmp_path / "probe"
    if not probe.exists():
        make_adapter(probe)
    return sum((probe / name).stat().st_size for name in ADAPTER_FILES)


def _add(store: AdapterStore[Any], tmp_path: Path, name: str, seed: int = 0, **kwargs: Any) -> Path:
    folder = tmp_path / "src" / name
    digest = make_adapter(folder, seed=seed, **kwargs)
    store.register(name, AdapterSource(str(folder), digest))
    return folder


def _key(tmp_path: Path, name: str) -> str:
    """The disk cache entry of the adapter `_add` made under this name: its weights hash and source."""
    return disk_key(adapter_weights_sha256(tmp_path / "src" / name), str(tmp_path / "src" / name))


def _same(weights: dict[str, torch.Tensor], folder: Path) -> bool:
    expected = parse_adapter(folder)
    return weights.keys() == expected.keys() and all(torch.equal(weights[k], expected[k]) for k in weights)


def test_a_cold_adapter_comes_from_its_source_then_from_host_memory(tmp_path: Path) -> None:
    with _store(tmp_path) as store:
        folder = _add(store, tmp_path, "a")
        assert store.state("a") is LoadState.COLD
        assert _same(store.get("a"), folder)
        assert store.state("a") is LoadState.READY
        assert store.get("a") is store.get("a")
        m = store.metrics()
        assert (m.source.hits, m.disk.misses, m.host.misses, m.host.hits) == (1, 1, 1, 2)
        assert m.host.nbytes == HOST_BYTES and m.disk.nbytes == _disk_size(tmp_path)
        assert m.source.num_loads == 1 and m.disk.num_loads == 1 and m.disk.p50_load_seconds is not None


def test_file_uri_with_escaped_characters_is_a_local_folder(tmp_path: Path) -> None:
    with _store(tmp_path) as store:
        folder = tmp_path / "my adapters" / "a"
        digest = make_adapter(folder)
        store.register("a", AdapterSource("file://" + str(folder).replace(" ", "%20"), digest))
        assert _same(store.get("a"), folder)


def test_host_memory_evicts_least_recently_used_and_keeps_its_budget(tmp_path: Path) -> None:
    with _store(tmp_path, num_host=2.5) as store:
        for i, name in enumerate("abc"):
            _add(store, tmp_path, name, seed=i)
        store.get("a")
        store.get("b")
        store.get("a")  # b is now the least recently used
        store.get("c")
        assert store.host_ids() == ["a", "c"]
        assert store.state("b") is LoadState.COLD
        m = store.metrics()
        assert m.host.evictions == 1 and m.host.nbytes == 2 * HOST_BYTES <= store.config.max_host_bytes
        store.get("b")  # back from the disk cache, not the source
        m = store.metrics()
        assert (m.disk.hits, m.source.hits) == (1, 3)


def test_disk_cache_evicts_least_recently_used_and_keeps_its_budget(tmp_path: Path) -> None:
    with _store(tmp_path, num_host=1, num_disk=2.5) as store:
        for i, name in enumerate("abc"):
            _add(store, tmp_path, name, seed=i)
        keys = {name: _key(tmp_path, name) for name in "abc"}
        store.get("a")
        store.get("b")
        store.get("a")  # a disk hit: a is now the most recently used on disk
        store.get("c")
        assert store.disk_keys() == [keys["a"], keys["c"]]
        assert not (tmp_path / "cache" / keys["b"]).exists()
        m = store.metrics()
        assert m.disk.evictions == 1 and m.disk.nbytes <= store.config.max_disk_bytes
        store.get("b")
        assert store.metrics().source.hits == 4


def test_disk_cache_survives_a_restart_in_lru_order(tmp_path: Path) -> None:
    with _store(tmp_path, num_host=1) as store:
        folders = {name: _add(store, tmp_path, name, seed=i) for i, name in enumerate("abc")}
        keys = {name: _key(tmp_path, name) for name in "abc"}
        for name in "abca":  # a's last use is the latest; b's the oldest
            store.get(name)
            time.sleep(0.02)  # apart by more than the file system's timestamp tick
    with _store(tmp_path) as store:
        for name, folder in folders.items():
            store.register(name, AdapterSource(str(folder), adapter_weights_sha256(folder).hex()))
        assert store.disk_keys() == [keys["b"], keys["c"], keys["a"]]
        assert _same(store.get("a"), folders["a"])
        m = store.metrics()
        assert (m.disk.hits, m.source.hits) == (1, 0)
    with _store(tmp_path, num_disk=2) as store:  # a smaller budget: the oldest goes at start
        assert store.disk_keys() == [keys["c"], keys["a"]]


def test_pinned_adapters_stay_in_host_memory_and_on_disk(tmp_path: Path) -> None:
    with _store(tmp_path, num_host=2, num_disk=2) as store:
        folder = tmp_path / "src" / "pinned"
        digest = make_adapter(folder, seed=99)
        store.register("pinned", AdapterSource(str(folder), digest, is_pinned=True))
        store.prefetch("pinned").result()
        for i in range(6):
            _add(store, tmp_path, f"x{i}", seed=i)
            store.get(f"x{i}")
        assert store.state("pinned") is LoadState.READY
        assert _key(tmp_path, "pinned") in store.disk_keys()
        m = store.metrics()
        assert m.host.nbytes <= store.config.max_host_bytes and m.disk.nbytes <= store.config.max_disk_bytes
        assert m.num_pinned == 1
        store.unpin("pinned")
        store.get("x0")
        store.get("x1")
        assert store.state("pinned") is LoadState.COLD


def test_a_wrong_hash_is_refused_before_parse_and_the_copy_deleted(tmp_path: Path) -> None:
    parsed: list[Path] = []

    def counting_parse(files: AdapterFiles) -> dict[str, torch.Tensor]:
        parsed.append(files.folder)
        return parse_adapter(files)

    with _store(tmp_path, parse=counting_parse) as store:
        folder = tmp_path / "src" / "a"
        make_adapter(folder)
        registered = make_adapter(tmp_path / "other", seed=7)
        store.register("a", AdapterSource(str(folder), registered))
        good = _add(store, tmp_path, "good", seed=1)
        with pytest.raises(AdapterIntegrityError) as caught:
            store.get("a")
        assert caught.value.facts["expected"] == registered and caught.value.facts["actual"] != registered
        assert parsed == []
        assert store.state("a") is LoadState.FAILED and store.error("a") is caught.value
        assert store.disk_keys() == [] and list((tmp_path / "cache" / ".tmp").iterdir()) == []
        assert _same(store.get("good"), good)  # the failure stays with its adapter


def test_a_corrupted_file_fails_with_a_format_error_not_a_crash(tmp_path: Path) -> None:
    with _store(tmp_path) as store:
        folder = tmp_path / "src" / "a"
        make_adapter(folder)
        weights = folder / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-100])  # truncated, then registered as it is
        store.register("a", AdapterSource(str(folder), to_hex(adapter_weights_sha256(folder))))
        with pytest.raises(AdapterFormatError, match="truncated"):
            store.get("a")
        assert store.disk_keys() == []


class _Boom:
    """Unpickling this writes a marker file: proof that nothing was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def test_pickled_weights_are_refused_and_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    with _store(tmp_path) as store:
        for name, save in (("zip", lambda p: torch.save({"x": _Boom(marker)}, p)),
                           ("raw", lambda p: p.write_bytes(__import__("pickle").dumps(_Boom(marker))))):
            folder = tmp_path / "src" / name
            make_adapter(folder)
            save(folder / "adapter_model.safetensors")
            store.register(name, AdapterSource(str(folder), to_hex(adapter_weights_sha256(folder))))
            with pytest.raises(AdapterFormatError, match="pickle"):
                store.get(name)
        bin_only = tmp_path / "src" / "bin"
        make_adapter(bin_only)
        (bin_only / "adapter_model.safetensors").rename(bin_only / "adapter_model.bin")
        store.register("bin", AdapterSource(str(bin_only), "0x" + "00" * 32))
        with pytest.raises(AdapterFormatError, match=r"adapter_model\.bin"):
            store.get("bin")
    assert not marker.exists()


def test_an_oversized_adapter_is_refused_per_tier(tmp_path: Path) -> None:
    with _store(tmp_path, max_download_bytes=_disk_size(tmp_path) - 1) as store:
        _add(store, tmp_path, "a")
        with pytest.raises(AdapterTooLarge):
            store.get("a")
    with _store(tmp_path, num_host=0.5) as store:
        _add(store, tmp_path, "b")
        with pytest.raises(AdapterTooLarge, match="host memory"):
            store.get("b")
        assert store.state("b") is LoadState.FAILED


def test_an_oversized_rank_fails_alone_with_the_reason(tmp_path: Path) -> None:
    def parse_max_rank_8(files: AdapterFiles) -> dict[str, torch.Tensor]:
        weights = parse_adapter(files)
        rank = max(t.shape[0] for k, t in weights.items() if "lora_A" in k)
        if rank > 8:
            raise AdapterFormatError(f"rank {rank} exceeds max_lora_rank 8", rank=rank)
        return weights

    with _store(tmp_path, parse=parse_max_rank_8) as store:
        _add(store, tmp_path, "big", rank=16)
        small = _add(store, tmp_path, "small", rank=8)
        with pytest.raises(AdapterFormatError, match="rank 16 exceeds"):
            store.get("big")
        assert _same(store.get("small"), small)
        assert store.state("big") is LoadState.FAILED and store.metrics().num_failed == 1


def test_a_failed_adapter_is_retried_later(tmp_path: Path) -> None:
    folder = tmp_path / "src" / "late"
    digest = make_adapter(tmp_path / "elsewhere")
    with _store(tmp_path, retry_after_s=3600) as store:
        store.register("late", AdapterSource(str(folder), digest))
        first = store.prefetch("late").exception()
        assert isinstance(first, AdapterSourceError)
        assert store.prefetch("late").exception() is first  # within retry_after_s: the same answer
        assert store.metrics().source.misses == 1
    with _store(tmp_path) as store:
        store.register("late", AdapterSource(str(folder), digest))
        assert store.prefetch("late").exception() is not None
        folder.parent.mkdir(parents=True)
        (tmp_path / "elsewhere").rename(folder)
        assert _same(store.get("late"), folder)


def test_unknown_unregistered_and_reregistered_adapters(tmp_path: Path) -> None:
    with _store(tmp_path) as store:
        assert store.state("nope") is LoadState.UNKNOWN
        with pytest.raises(AdapterNotFound):
            store.get("nope")
        _add(store, tmp_path, "a")
        store.get("a")
        store.unregister("a")
        assert store.state("a") is LoadState.UNKNOWN and store.metrics().host.nbytes == 0
        folder = _add(store, tmp_path, "a2", seed=5)
        store.register("a", AdapterSource(str(folder), adapter_weights_sha256(folder).hex()))
        assert _same(store.get("a"), folder)
        with pytest.raises(AdapterFormatError, match="sha256"):
            store.register("bad", AdapterSource(str(folder), "0x1234"))


def test_evicted_weights_are_freed(tmp_path: Path) -> None:
    with _store(tmp_path, num_host=1) as store:
        _add(store, tmp_path, "a")
        _add(store, tmp_path, "b", seed=1)
        ref = weakref.ref(next(iter(store.get("a").values())))
        store.get("b")
        gc.collect()
        assert ref() is None


def test_weights_a_prefetch_loaded_are_freed_on_eviction_without_the_garbage_collector(tmp_path: Path) -> None:
    """A prefetch's future must not sit in a reference cycle with its job: the evicted weights (and the
    host buffer they view) go back at once, not at the next collection."""
    with _store(tmp_path, num_host=1) as store:
        _add(store, tmp_path, "a")
        _add(store, tmp_path, "b", seed=1)
        gc.collect()
        gc.disable()
        try:
            ref = weakref.ref(next(iter(store.prefetch("a").result().values())))
            store.prefetch("b").result()  # evicts a from host memory
            assert ref() is None
        finally:
            gc.enable()


def test_concurrent_readers_see_correct_weights_within_budget(tmp_path: Path) -> None:
    with _store(tmp_path, num_host=3, num_disk=6) as store:
        folders = {f"a{i}": _add(store, tmp_path, f"a{i}", seed=i) for i in range(10)}
        expected = {name: parse_adapter(folder) for name, folder in folders.items()}
        errors: list[BaseException] = []

        def reader(seed: int) -> None:
            gen = torch.Generator().manual_seed(seed)
            for _ in range(60):
                name = f"a{int(torch.randint(10, (1,), generator=gen))}"
                try:
                    weights = store.get(name)
                    assert all(torch.equal(weights[k], expected[name][k]) for k in expected[name])
                except BaseException as e:
                    errors.append(e)

        threads = [threading.Thread(target=reader, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        m = store.metrics()
        assert m.host.nbytes <= store.config.max_host_bytes and m.disk.nbytes <= store.config.max_disk_bytes
        assert m.num_loading == 0 and m.host.hits + m.host.misses <= 360
        assert m.host.misses == m.disk.hits + m.disk.misses  # one disk lookup per load started


def test_config_rejects_nonsense(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="max_host_bytes"):
        StoreConfig(cache_dir=tmp_path, max_disk_bytes=1, max_host_bytes=0)


@pytest.mark.parametrize("is_bad", [False, True])
def test_a_load_run_by_get_is_joined_not_repeated_and_cannot_be_cancelled(tmp_path: Path, is_bad: bool) -> None:
    started, go, num_parses = threading.Event(), threading.Event(), []

    def slow_parse(files: AdapterFiles) -> Any:
        num_parses.append(1)
        started.set()
        assert go.wait(10)
        if is_bad:
            raise AdapterFormatError("refused by the test")
        return parse_adapter(files)

    with _store(tmp_path, parse=slow_parse, retry_after_s=60.0) as store:
        _add(store, tmp_path, "a")
        results: dict[str, Any] = {}

        def get(who: str) -> None:
            try:
                results[who] = store.get("a")
            except AdapterFormatError as e:
                results[who] = e

        first = threading.Thread(target=get, args=("first",))
        first.start()  # loads on its own thread
        assert started.wait(10)
        joined = store.prefetch("a")
        second = threading.Thread(target=get, args=("second",))
        second.start()
        assert store.state("a") is LoadState.LOADING
        assert not joined.cancel()  # its waiters cannot cancel a load that runs
        go.set()
        for t in (first, second):
            t.join(10)
        assert len(num_parses) == 1
        if is_bad:
            assert results["first"] is results["second"] is joined.exception()
            assert store.state("a") is LoadState.FAILED
        else:
            assert results["first"] is results["second"] is joined.result(1) is store.get("a")
            assert store.state("a") is LoadState.READY
