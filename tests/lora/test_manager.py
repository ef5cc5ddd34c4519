"""LoRAManager, the one owner of adapter residency: device slots, pins and the operator's actions, on
the CPU with an in-memory provider (tiny hand-made adapters)."""

from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path

import pytest
import torch

from node.errors import AdapterNotFound, BadRequest, Overloaded
from node.lora.adapter import LoRATargetSpec, LoRAWeights, load_lora_adapter
from node.lora.adapter_files import AdapterFiles
from node.lora.content_hash import adapter_weights_sha256
from node.lora.copy_stream import AdapterCopyStream
from node.lora.manager import AdapterAction, ControlAdapter, LoRAManager
from node.lora.memory_provider import InMemoryAdapterProvider
from node.lora.provider import AdapterSource, LoadState
from node.lora.slots import LoRASlotPools
from node.lora.store import AdapterStore, StoreConfig
from node.protocol.hexstr import to_hex
from tests.fixtures.adapters import make_adapter
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


def test_a_stream_of_one_shot_adapters_never_pushes_a_hot_adapter_out_of_host_memory(tmp_path: Path) -> None:
    """A payer (a cheap request each) or a stranger (chat quotes) cycling through adapters that nobody
    asks for twice must not make the adapter that honest payers keep using wait a cold load again."""
    shapes = {m: (64, 64) for m in ("q_proj", "k_proj", "v_proj", "o_proj")}
    target = LoRATargetSpec.of(2, {**shapes, "gate_proj": (64, 128), "up_proj": (64, 128), "down_proj": (128, 64)})
    parses: list[AdapterFiles] = []

    def parse(files: AdapterFiles) -> LoRAWeights:
        parses.append(files)
        return load_lora_adapter(files, target=target, max_rank=4)

    names = ["hot", *(f"once{i}" for i in range(12))]
    for seed, name in enumerate(names):
        make_adapter(tmp_path / "src" / name, seed=seed)
    one = load_lora_adapter(tmp_path / "src" / "hot", target=target, max_rank=4).nbytes
    config = StoreConfig(cache_dir=tmp_path / "cache", max_host_bytes=4 * one, max_disk_bytes=1 << 26)
    with AdapterStore(config, parse, lambda w: w.nbytes) as store:
        for name in names:
            folder = tmp_path / "src" / name
            store.register(name, AdapterSource(str(folder), to_hex(adapter_weights_sha256(folder))))
        slots = LoRASlotPools.build(target, ((4, 2),), torch.float32, CPU)
        manager = LoRAManager(store, slots, AdapterCopyStream(CPU), post=lambda m: manager.apply(m, ()))
        for _ in range(5):  # honest payers' requests, served from its device slot
            manager.prepare("hot", in_use=(), is_first=True)
        for name in names[1:]:  # one request each, every slot and host entry they can take
            manager.prepare(name, in_use=(), is_first=True)
        num_loads = len(parses)
        manager.prepare("hot", in_use=(), is_first=True)
    assert len(parses) == num_loads == len(names)  # its next request found it in host memory: no second load
