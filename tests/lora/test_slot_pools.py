"""Device slots in pools by rank: placement, eviction within a pool, the per-pool LoRA hook (the same
deltas as one max-rank pool), the static plan the CUDA graphs capture, and the engine end to end."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest
import torch

from node.engine import EngineConfig, LLMEngine, SamplingParams
from node.errors import ConfigError, Overloaded
from node.lora.slots import LoRASlotPools, LoRASlots
from tests.fixtures.models import TinyAdapters
from tests.lora.test_slots import TARGET, _adapter
from tests.lora.test_triton_ops import kernels  # noqa: F401  (the fixture)

CPU = torch.device("cpu")


def _pools(*pools: tuple[int, int]) -> LoRASlotPools:
    return LoRASlotPools.build(TARGET, pools, torch.float32, CPU)


def test_an_adapter_takes_the_smallest_pool_that_holds_its_rank() -> None:
    pools = _pools((4, 2), (2, 1))  # given in any order: smallest rank first, ids 0 (rank 2), 1-2 (rank 4)
    assert [p.max_rank for p in pools.pools] == [2, 4] and pools.bases == [0, 1]
    assert pools.activate("r2", _adapter(2, 1), in_use=()) == 0
    assert pools.activate("r3", _adapter(3, 2), in_use=()) in (1, 2)
    assert pools.activate("r1", _adapter(1, 3), in_use=()) in (1, 2)  # its pool is full: a free larger slot
    assert not pools.has_free_slot(1)
    assert pools.slot_of == {"r2": 0, "r3": pools.lookup("r3"), "r1": pools.lookup("r1")}


def test_eviction_stays_in_the_smallest_fitting_pool_with_an_idle_adapter() -> None:
    pools = _pools((2, 1), (4, 1))
    pools.activate("small", _adapter(2, 1), in_use=())
    pools.activate("big", _adapter(4, 2), in_use=())
    assert pools.activate("small2", _adapter(1, 3), in_use=()) == 0  # evicts "small", not "big"
    assert set(pools.slot_of) == {"small2", "big"}
    assert pools.activate("small3", _adapter(2, 4), in_use={"small2"}) == 1  # its pool busy: evicts "big"
    with pytest.raises(Overloaded):
        pools.activate("big2", _adapter(4, 5), in_use={"small2", "small3"})


def test_rank_pools_give_the_same_deltas_as_one_max_rank_pool() -> None:
    adapters = {"a": _adapter(1, 1), "b": _adapter(2, 2), "c": _adapter(4, 3), "d": _adapter(3, 4)}
    pools, single = _pools((2, 2), (4, 2)), _pools((4, 4))
    order = ["a", "b", "c", "d", None, "b", "c", "a"]  # tokens, sorted or not
    x = torch.randn(len(order), 8)
    outs = {}
    for name, slots in (("pools", pools), ("single", single)):
        ids = {k: slots.activate(k, w, in_use=()) for k, w in adapters.items()}
        token_slots = [ids[k] if k else -1 for k in order]
        for form in ("gather", "segment"):
            qkv = torch.zeros(len(order), 16)
            batch = slots.batch(token_slots, form)
            assert batch is not None
            batch.apply(0, "qkv", x, qkv)
            outs[name, form] = qkv
    assert len(pools.batch([pools.lookup("a"), -1], "gather").parts) == 1  # type: ignore[list-item,union-attr]
    for form in ("gather", "segment"):
        assert torch.allclose(outs["pools", form], outs["single", form], atol=1e-5)
    assert outs["pools", "gather"][4].abs().sum() == 0  # the token without an adapter


def test_the_static_plans_the_graphs_capture_match_the_per_step_plans(kernels: ModuleType) -> None:  # noqa: F811
    """The CUDA graphs' plans: every pool's launch reads the one buffer of global ids, the fused Triton
    gather kernel (here interpreted) subtracting the pool's first id and skipping the others' ids;
    a graph holds launches only for the pools its step's adapters live in."""
    from node.lora import triton_fused

    pools = _pools((2, 2), (4, 2), (8, 1))
    ids = [pools.activate(k, _adapter(r, i), in_use=()) for i, (k, r) in enumerate((("a", 2), ("b", 4), ("c", 3)))]
    token_slots = [ids[2], -1, ids[0], ids[1], ids[0]]
    assert pools.pools_in_use(token_slots) == (0, 1) and pools.pools_in_use([-1, -1]) == ()
    x = torch.randn(5, 8)
    step, static = torch.zeros(5, 16), torch.zeros(5, 16)
    pools.batch(token_slots, "gather").apply(0, "qkv", x, step)  # type: ignore[union-attr]
    static_batch = pools.static_batch(torch.tensor(token_slots, dtype=torch.int32), pools.pools_in_use(token_slots))
    assert [pool.max_rank for pool, _ in static_batch.parts] == [2, 4]
    for pool, plan in static_batch.parts:
        triton_fused.lora_gather_fused(x, static, pool.a[0]["qkv"], pool.b_group[0]["qkv"], pool.widths["qkv"],
                                       pool.ranks, plan.token_slots, plan.slot_base)
    assert torch.allclose(step, static, atol=1e-4) and static[1].abs().sum() == 0


def test_pools_take_the_bytes_of_their_ranks() -> None:
    per_rank_4 = LoRASlots.slot_nbytes(TARGET, 4, torch.float32)
    assert LoRASlotPools.pools_nbytes(TARGET, ((1, 4), (4, 1)), torch.float32) == 2 * per_rank_4


def test_an_engine_with_rank_pools_answers_as_with_one_pool(tiny_model: Path, tiny_adapters: TinyAdapters) -> None:
    names = ("sea-r8", "count-r4", "food-r16")
    base = dict(model_path=tiny_model, max_model_len=64, max_lora_rank=16)
    answers = []
    for extra in ({"max_adapter_slots": 3}, {"adapter_rank_pools": ((4, 1), (8, 1), (16, 1))}):
        engine = LLMEngine(EngineConfig(**base, **extra))  # type: ignore[arg-type]
        for name in names:
            engine.add_adapter(name, tiny_adapters.paths[name])
        outs = engine.generate([[5, 6, 7, 8]] * 6, SamplingParams(max_tokens=6, temperature=0),
                               [names[i % 3] for i in range(6)])
        answers.append([o.token_ids for o in outs])
        if "adapter_rank_pools" in extra:
            assert {n: engine.runner.slots.lookup(n) for n in names} == {"count-r4": 0, "sea-r8": 1, "food-r16": 2}
    assert answers[0] == answers[1]


def test_rank_pools_are_checked_against_max_lora_rank_and_the_byte_budget(tiny_model: Path) -> None:
    base = dict(model_path=tiny_model, max_model_len=64, max_lora_rank=16)
    with pytest.raises(ConfigError, match="largest pool's rank"):
        EngineConfig(**base, adapter_rank_pools=((8, 4),))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="distinct ranks"):
        EngineConfig(**base, adapter_rank_pools=((16, 1), (16, 2)))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="more than max_adapter_memory_bytes"):
        LLMEngine(EngineConfig(**base, adapter_rank_pools=((8, 4), (16, 4)),  # type: ignore[arg-type]
                               max_adapter_memory_bytes=1024))


def test_a_request_whose_rank_has_no_free_slot_waits_for_one(tiny_model: Path, tiny_adapters: TinyAdapters) -> None:
    """Two rank-16 adapters, one rank-16 slot: the second request is deferred (not failed, not the
    step) until the first one's sequence ends and frees the slot."""
    config = EngineConfig(model_path=tiny_model, max_model_len=64, max_lora_rank=16,
                          adapter_rank_pools=((4, 2), (16, 1)))
    engine = LLMEngine(config)
    for name in ("food-a", "food-b"):
        engine.add_adapter(name, tiny_adapters.paths["food-r16"])
    engine.add_adapter("count", tiny_adapters.paths["count-r4"])
    outs = engine.generate([[5, 6, 7, 8]] * 3, SamplingParams(max_tokens=4, temperature=0),
                           ["food-a", "food-b", "count"])
    assert [o.finish_reason for o in outs] == ["length"] * 3
    assert outs[0].token_ids == outs[1].token_ids  # the same weights under two ids
    assert engine.scheduler.max_adapters == 3  # the pools' slots, not max_adapter_slots
