"""The engine's own figures (queue, KV cache, the device tier of adapter slots), in process and from
engine core processes, where the API reads them for /metrics."""

from __future__ import annotations

import time
from pathlib import Path

from node.engine import EngineConfig, LLMEngine, SamplingParams
from node.engine.core_client import CoreClient
from node.engine.stats import device_tier, engine_stats
from tests.fixtures.models import TinyAdapters

GREEDY = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)


def _config(tiny_model: Path, slots: int) -> EngineConfig:
    return EngineConfig(model_path=tiny_model, max_num_seqs=4, max_model_len=128, max_adapter_slots=slots,
                        max_lora_rank=16)


def test_the_device_tier_counts_hits_misses_loads_and_evictions(tiny_model: Path,
                                                                tiny_adapters: TinyAdapters) -> None:
    engine = LLMEngine(_config(tiny_model, slots=1))
    for name in ("sea-r8", "count-r4"):
        engine.add_adapter(name, tiny_adapters.paths[name])
    assert device_tier(engine)["num_slots"] == 1 and device_tier(engine)["nbytes"] == 0
    engine.generate(["the sea"], GREEDY, ["sea-r8"])  # a miss, a load
    engine.generate(["the sea"], GREEDY, ["sea-r8"])  # a hit
    engine.generate(["one two"], GREEDY, ["count-r4"])  # a miss: the only slot's idle adapter goes
    tier = device_tier(engine)
    assert (tier["hits"], tier["misses"], tier["num_loads"], tier["evictions"]) == (1, 2, 2, 1)
    assert tier["nbytes"] > 0 and tier["num_resident"] == 1
    stats = engine_stats(engine)
    assert stats["kv_blocks"] > 0 and stats["kv_blocks_used"] == 0 and stats["num_running"] == 0


def test_a_request_that_starts_on_a_cached_prefix_counts_once_as_a_device_hit(tiny_model: Path,
                                                                              tiny_adapters: TinyAdapters) -> None:
    engine = LLMEngine(_config(tiny_model, slots=1))
    engine.add_adapter("sea-r8", tiny_adapters.paths["sea-r8"])
    prompt = " ".join(["the sea is wide and deep"] * 12)  # many full KV blocks: the second request skips them
    for _ in range(2):
        engine.generate([prompt], GREEDY, ["sea-r8"])
    assert engine.kv_cache_stats().num_hit_tokens > 0
    tier = device_tier(engine)
    assert (tier["hits"], tier["misses"]) == (1, 1)  # a request is one use of its adapter, cached prefix or not


def test_engine_core_processes_report_their_figures_to_the_api_side(tiny_model: Path,
                                                                     tiny_adapters: TinyAdapters) -> None:
    client = CoreClient(_config(tiny_model, slots=2), num_cores=1, num_threads=1)
    client.start()
    try:
        client.add_adapter("sea-r8", str(tiny_adapters.paths["sea-r8"]))
        client.generate(["the sea"], GREEDY, ["sea-r8"])
        deadline = time.monotonic() + 60  # the core reports about once a second
        while client.metrics.store_metrics().get("device", {}).get("num_loads", 0) < 1:
            assert time.monotonic() < deadline, "no device-tier figures came from the core"
            time.sleep(0.1)
        assert client.metrics.engine_stats()["kv_blocks"] > 0
        device = client.metrics.store_metrics()["device"]
        assert device["hits"] + device["misses"] == 1  # staged into a free slot ahead of it, or copied in
    finally:
        client.shutdown()
