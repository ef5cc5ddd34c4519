"""LoRAManager, the one owner of adapter residency: device slots, pins and the operator's actions, on
the CPU with an in-memory provider (tiny hand-made adapters)."""

from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path

import pytest
import torch

from node.errors import AdapterNotFound, BadRequest, Overloaded
from node.lora.adapter import LoRAWeights
from node.lora.copy_stream import AdapterCopyStream
from node.lora.manager import AdapterAction, ControlAdapter, LoRAManager
from node.lora.memory_provider import InMemoryAdapterProvider
from node.lora.provider import AdapterSource, LoadState
from node.lora.slots import LoRASlotPools
from tests.lora.test_slots import TARGET, _adapter

CPU = torch.device("cpu")


def _manager(num_slots: int, *names: str) -> LoRAManager:
    weights = {name: _adapter(2, seed) for seed, name in enumerate(names)}
    provider: InMemoryAdapterProvider[LoRAWeights] = InMemoryAdapterProvider(lambda folder: weights[folder.name])
    slots = LoRASlotPools.build(TARGET, ((4, num_slots),), torch.float32, CPU)
    manager = LoRAManager(provider, slots, AdapterCopyStream(CPU), post=lambda m: manager.apply(m, ()))
    for name in names:
        manager.register(name, AdapterSource(uri=str(Path("/adapters") / name), sha256=""))
    return manager


def _act(manager: LoRAManager, adapter_id: str, action: AdapterAction, in_use: tuple[str, ...] = ()) -> None:
    done: Future[None] = Future()
    manager.apply(ControlAdapter(adapter_id, action, done), in_use)
    done.result(timeout=5)


def test_prepare_puts_an_adapter_in_a_slot_and_counts_the_first_step_a_miss_then_hits() -> None:
    manager = _manager(2, "a")
    slot = manager.prepare("a", in_use=(), is_first=True)
    assert manager.slot("a") == slot and manager.prepare(None, in_use=()) == -1
    manager.prepare("a", in_use=(), is_first=True)
    assert (manager.slots.num_misses, manager.slots.num_hits) == (1, 1)


def test_a_pinned_adapter_is_never_evicted_for_another() -> None:
    manager = _manager(2, "pinned", "b", "c")
    _act(manager, "pinned", AdapterAction.PIN)
    manager.prepare("b", in_use=())
    manager.prepare("c", in_use=())  # the one unpinned slot changes hands
    assert set(manager.slots.slot_of) == {"pinned", "c"}
    _act(manager, "pinned", AdapterAction.UNPIN)
    manager.prepare("b", in_use=("c",))
    assert set(manager.slots.slot_of) == {"b", "c"}


def test_pinning_refuses_to_take_the_last_unpinned_slot() -> None:
    manager = _manager(2, "a", "b")
    _act(manager, "a", AdapterAction.PIN)
    with pytest.raises(Overloaded, match="no device slot"):
        _act(manager, "b", AdapterAction.PIN)


def test_evict_is_refused_while_a_request_of_it_runs_and_frees_the_slot_when_idle() -> None:
    manager = _manager(2, "a")
    _act(manager, "a", AdapterAction.PRELOAD)
    with pytest.raises(BadRequest, match="running"):
        _act(manager, "a", AdapterAction.EVICT, in_use=("a",))
    _act(manager, "a", AdapterAction.EVICT)
    assert manager.slots.slot_of == {}


def test_stage_copies_only_into_free_slots_and_drop_forgets_every_tier() -> None:
    manager = _manager(1, "a", "b")
    manager.prepare("a", in_use=())
    manager.provider.get("b")
    assert manager.stage(["b"]) == []  # no free slot: never evicts
    manager.drop("a")
    assert manager.state("a") is LoadState.UNKNOWN and manager.stage(["b"]) == ["b"]
    with pytest.raises(AdapterNotFound):
        manager.prepare("a", in_use=())
