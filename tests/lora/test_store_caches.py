"""The two cache tiers on their own, and hot adapters under a burst of cold loads."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from node.lora.adapter_files import AdapterFiles
from node.lora.disk_cache import DiskCache, disk_key
from node.lora.host_cache import HostCache
from node.lora.provider import AdapterSource, LoadState
from node.lora.store import AdapterStore, StoreConfig
from tests.fixtures.adapters import adapter_nbytes, make_adapter, parse_adapter


def test_host_cache_order_budget_and_pins() -> None:
    cache: HostCache[str] = HostCache(max_bytes=30)
    assert cache.put("a", "A", 10) == [] and cache.put("b", "B", 10) == [] and cache.put("c", "C", 10) == []
    cache.get("a")
    assert cache.put("d", "D", 10) == ["b"]  # b was the least recently used
    cache.pin("c")
    cache.pin("d")
    assert cache.put("e", "E", 15) == ["a", "e"]  # a goes; e still does not fit beside 20 pinned bytes
    assert cache.keys() == ["c", "d"] and cache.nbytes == 20
    cache.pin("big")
    assert cache.put("big", "BIG", 25) == []  # pinned: kept, over budget (the operator asked for it)
    assert cache.nbytes == 45
    assert cache.unpin("c") == ["c"] and cache.nbytes == 35
    assert cache.unpin("d") == ["d"] and cache.nbytes == 25


def test_host_cache_keeps_adapters_used_twice_ahead_of_a_scan_of_one_shots() -> None:
    cache: HostCache[str] = HostCache(max_bytes=40)
    for key in ("hot", "warm"):
        cache.put(key, key.upper(), 10)
        cache.use(key)
    cache.use("hot")  # a second request: protected
    evicted = [k for i in range(20) for k in cache.put(f"once{i}", "X", 10)]
    assert "hot" in cache and "warm" in evicted  # one use is no protection: the scan takes it in turn
    for key in ("a", "b", "c"):  # protected past their share (80%): the least recently used is on probation
        cache.put(key, key.upper(), 10)
        cache.use(key)
        cache.use(key)
    assert cache.keys()[-3:] == ["a", "b", "c"] and cache.keys()[0] == "hot"
    cache.use("hot")  # one more request protects it again
    assert cache.keys()[-1] == "hot"


def _entry(root: Path, seed: int) -> tuple[Path, str]:
    temp = root / f"t{seed}"
    digest = make_adapter(temp, seed=seed)
    return temp, disk_key(bytes.fromhex(digest[2:]), str(temp))


def test_disk_cache_never_evicts_leased_or_protected_entries(tmp_path: Path) -> None:
    size = _entry(tmp_path / "probe", 0)[0]
    one = sum(p.stat().st_size for p in size.iterdir())
    cache = DiskCache(tmp_path / "cache", max_bytes=2 * one)
    temps = [_entry(tmp_path / "src", i) for i in range(4)]
    (_, k0), (_, k1), (_, k2), (_, k3) = temps
    cache.commit(*temps[0])  # leased until released
    cache.commit(*temps[1])
    cache.release(k1)
    cache.protect(k1)
    _, evicted = cache.commit(*temps[2])
    assert evicted == 0 and cache.keys() == [k0, k1, k2]  # over budget: nothing may go
    cache.release(k0)
    cache.release(k2)
    _, evicted = cache.commit(*temps[3])
    cache.release(k3)
    assert evicted == 2 and cache.keys() == [k1, k3] and cache.nbytes == 2 * one
    on_disk = sorted(p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith("."))
    assert on_disk == sorted([k1, k3])


def test_disk_cache_start_cleans_its_own_leftovers_only(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    (root / ".tmp" / "half").mkdir(parents=True)
    (root / disk_key(b"\xab" * 32, "/gone")).mkdir()  # an entry missing its files
    (root / "operator-notes.txt").write_text("keep me")
    temp, key = _entry(tmp_path, 1)
    temp.rename(root / key)
    cache = DiskCache(root, max_bytes=1 << 20)
    assert cache.keys() == [key]
    assert sorted(p.name for p in root.iterdir()) == sorted([key, "operator-notes.txt"])


def test_a_burst_of_cold_loads_does_not_delay_hot_adapters(tmp_path: Path) -> None:
    def slow_parse(files: AdapterFiles) -> dict[str, torch.Tensor]:
        time.sleep(0.05)
        return parse_adapter(files)

    config = StoreConfig(cache_dir=tmp_path / "cache", max_host_bytes=1 << 20, max_disk_bytes=1 << 22)
    with AdapterStore(config, slow_parse, adapter_nbytes) as store:
        for i in range(31):
            folder = tmp_path / "src" / f"a{i}"
            store.register(f"a{i}", AdapterSource(str(folder), make_adapter(folder, seed=i)))
        store.get("a0")
        burst = [store.prefetch(f"a{i}") for i in range(1, 31)]  # 1.5 s of loads on 2 workers
        store.get("a0")
        still_loading = sum(store.state(f"a{i}") is LoadState.LOADING for i in range(1, 31))
        assert still_loading >= 10  # 0 if the hot get had waited for the burst
        for future in burst:
            future.result()


def test_a_cancelled_or_abandoned_load_never_wedges_its_adapter(tmp_path: Path) -> None:
    def slow_parse(files: AdapterFiles) -> dict[str, torch.Tensor]:
        time.sleep(0.1)
        return parse_adapter(files)

    config = StoreConfig(cache_dir=tmp_path / "cache", max_host_bytes=1 << 20, max_disk_bytes=1 << 22,
                         num_load_workers=1)
    store = AdapterStore(config, slow_parse, adapter_nbytes)
    for name in "abc":
        folder = tmp_path / "src" / name
        store.register(name, AdapterSource(str(folder), make_adapter(folder, seed=ord(name))))
    running, queued = store.prefetch("a"), store.prefetch("b")
    assert queued.cancel()  # the caller gave up before a worker took it
    assert store.state("b") is LoadState.COLD
    assert set(store.get("b")) == set(running.result())  # a new load, not the cancelled future
    left_queued = [store.prefetch("c")] if store.state("c") is LoadState.COLD else []
    store.prefetch("a")
    store.close()
    assert all(f.done() for f in left_queued)  # closing never leaves a waiter hanging
