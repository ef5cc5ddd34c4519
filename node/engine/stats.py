"""What an engine says about itself when the API is scraped: flat named figures, and its device tier.

`engine_stats` names its figures the Prometheus way: one that only grows ends in `_total` and is
exported as a counter, any other is a gauge. The API exports every key as `loranode_engine_<key>`
without knowing it in advance (node/api/metric_sources.py), summed over engine core processes, so a
new figure is one line here and one row in docs/metrics.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from node.engine.llm_engine import LLMEngine


def engine_stats(engine: LLMEngine) -> dict[str, float]:
    """Queue, KV-cache and prefix-cache figures, read from the step thread's structures (a moment's snapshot)."""
    scheduler, blocks, cache = engine.scheduler, engine.block_manager, engine.kv_cache_stats()
    return {"num_running": float(len(scheduler.running)), "num_waiting": float(len(scheduler.waiting)),
            "kv_blocks": float(blocks.num_blocks), "kv_blocks_used": float(blocks.num_blocks - blocks.num_free),
            "prefix_cache_hit_tokens_total": float(cache.num_hit_tokens),
            "prefix_cache_query_tokens_total": float(cache.num_queried_tokens),
            "prefix_cache_blocks": float(cache.num_cached_blocks),
            "prefix_cache_evictions_total": float(cache.num_evictions), "steps_total": float(engine.num_steps)}


def device_tier(engine: LLMEngine) -> dict[str, float]:
    """The adapter slots on the device, as the adapter store reports its tiers (stat -> value)."""
    return {name: float(value) for name, value in engine.adapters.slots.stats().items()}
