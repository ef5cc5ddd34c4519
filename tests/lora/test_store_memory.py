"""10,000 load/evict cycles through the host tier: resident memory stays flat (no leak on unload)."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest

from node.lora.provider import AdapterSource
from node.lora.store import AdapterStore, StoreConfig
from tests.fixtures.adapters import adapter_nbytes, make_adapter, parse_adapter

NUM_CYCLES = 10_000
NUM_ADAPTERS = 8
ADAPTER_BYTES = 2 * 2 * 2 * 8 * 256 * 4  # layers x (q, v) x (A + B) x rank x hidden x f32 = 64 KiB
MAX_GROWTH_BYTES = 24 << 20  # a leak of one adapter per cycle would be 640 MiB


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.slow
def test_ten_thousand_load_evict_cycles_keep_memory_flat(tmp_path: Path) -> None:
    config = StoreConfig(cache_dir=tmp_path / "cache", max_host_bytes=2 * ADAPTER_BYTES,
                         max_disk_bytes=1 << 30, num_recent_samples=256)
    with AdapterStore(config, parse_adapter, adapter_nbytes) as store:
        for i in range(NUM_ADAPTERS):
            folder = tmp_path / "src" / f"a{i}"
            digest = make_adapter(folder, hidden=256, rank=8, seed=i)
            store.register(f"a{i}", AdapterSource(str(folder), digest))

        def cycles(n: int) -> None:
            for i in range(n):
                adapter_id = f"a{i % NUM_ADAPTERS}"  # never resident: 2 fit, 8 rotate
                # half on the calling thread (get), half on the load workers (prefetch)
                weights = store.get(adapter_id) if i % 2 else store.prefetch(adapter_id).result()
                assert adapter_nbytes(weights) == ADAPTER_BYTES
                del weights

        cycles(1_000)  # warm up allocator arenas, thread pools, caches
        gc.collect()
        before = _rss_bytes()
        cycles(NUM_CYCLES)
        gc.collect()
        growth = _rss_bytes() - before
        m = store.metrics()
        assert m.host.evictions >= NUM_CYCLES + 1_000 - 2
        assert m.host.nbytes <= config.max_host_bytes
        assert len(m.disk.recent_load_seconds) == 256
        assert growth < MAX_GROWTH_BYTES, f"resident memory grew {growth / 2**20:.1f} MiB"
