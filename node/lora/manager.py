"""LoRAManager: the one owner of where each adapter is and where it moves.

An adapter lives in tiers: its source (a URI with a registered sha256), the disk cache and host
memory (both kept by the provider, `node.lora.store` or the in-memory one), and a device slot
(`node.lora.slots`). The manager is what the engine and its scheduler ask about all of them: whether
an adapter is known, loaded, failed; which device slot holds it; it starts the background loads of
upcoming adapters and keeps them while they are in flight, copies adapters into slots (ordered on
the copy stream), keeps the pin state, and applies the operator's residency actions. It runs on the
engine's step thread, the only one that touches the device slots.

What the operator asks (`loranode adapter pin|unpin|preload|evict`):
- pin: keep it in host memory and on disk (the adapter store's pin) and, once in a device slot, never
  evict it for another adapter; it is copied in now. At least one slot stays unpinned for traffic.
- unpin: back to least-recently-used everywhere.
- preload: load it into host memory and copy it into a device slot (evicting an idle, unpinned
  adapter if none is free), so that its next request finds it there.
- evict: out of its device slot and unpinned; refused while a request of it runs.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Collection, Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, cast

from node.errors import BadRequest, Overloaded
from node.lora.adapter import LoRAWeights
from node.lora.copy_stream import AdapterCopyStream
from node.lora.loads import AdapterLoads
from node.lora.provider import AdapterProvider, AdapterSource, LoadState
from node.lora.slots import LoRASlotPools

BASE_MODEL_SLOT = -1  # the adapter slot of a token with no adapter


class AdapterAction(enum.StrEnum):
    PIN = "pin"
    UNPIN = "unpin"
    PRELOAD = "preload"
    EVICT = "evict"


@dataclass(frozen=True)
class ControlAdapter:
    """An operator's residency action; `done` is resolved on the step thread once it took effect."""

    adapter_id: str
    action: AdapterAction
    done: Future[None]


class LoRAManager:
    def __init__(self, provider: AdapterProvider[LoRAWeights], slots: LoRASlotPools, copies: AdapterCopyStream,
                 post: Callable[[ControlAdapter], None]) -> None:
        """`post` hands a control action back to the step thread (when the load it waited on ends)."""
        self.provider, self.slots, self.copies, self.post = provider, slots, copies, post
        self.loads = AdapterLoads(provider)  # in flight to host memory: what the scheduler asks
        self.pinned: set[str] = set()  # never evicted from a device slot for another adapter
        # the store's count of requests per adapter in host memory (`AdapterStore.use`): device hits too
        self._use: Callable[[str], None] = getattr(provider, "use", lambda _: None)

    # --- the tiers ------------------------------------------------------------------------------
    def register(self, adapter_id: str, source: AdapterSource) -> None:
        self.provider.register(adapter_id, source)

    def state(self, adapter_id: str) -> LoadState:
        """Where the adapter's weights are on the host side (UNKNOWN: never registered, or removed)."""
        return self.provider.state(adapter_id)

    def prefetch(self, adapter_id: str) -> Future[object]:
        """Load it into host memory in the background (deduplicated by the provider)."""
        return self.provider.prefetch(adapter_id)

    def chat_template(self, adapter_id: str) -> str | None:
        return self.provider.chat_template(adapter_id)

    def drop(self, adapter_id: str) -> None:
        """Unregister it and free its device slot (its requests were ended before)."""
        self.provider.unregister(adapter_id)
        self.slots.remove(adapter_id)
        self.pinned.discard(adapter_id)

    # --- device slots ---------------------------------------------------------------------------
    def slot(self, adapter_id: str | None) -> int:
        """The device slot of an adapter made resident by `prepare` this step (-1: the base model)."""
        if adapter_id is None:
            return BASE_MODEL_SLOT
        slot = self.slots.lookup(adapter_id)
        assert slot is not None, "prepare() put every scheduled adapter in a slot"
        return slot

    def prepare(self, adapter_id: str | None, in_use: Collection[str], is_first: bool = False) -> int:
        """Make sure the adapter is in a device slot before the step; returns the slot. Raises
        Overloaded (every slot of its rank holds a running sequence's adapter) or an AdapterError. A
        request's `is_first` step counts a device-tier hit or miss, and a use of its host copy."""
        if adapter_id is None:
            return BASE_MODEL_SLOT
        slot = self.slots.lookup(adapter_id)  # on the device already: no host-tier lookup
        if is_first:
            if slot is not None:
                self.slots.num_hits += 1
            else:
                self.slots.num_misses += 1
        if slot is None:
            slot = self._activate(adapter_id, self.provider.get(adapter_id), in_use, self.copies)
        if is_first:
            self._use(adapter_id)
        return slot

    def stage(self, adapter_ids: Iterable[str]) -> list[str]:
        """Copy adapters already in host memory into free device slots (never evicting one), so that
        their requests find them there when admitted. Never waits on a load; returns those copied."""
        staged = []
        for adapter_id in adapter_ids:
            if not self.slots.has_free_slot(1):
                break
            if self.slots.lookup(adapter_id) is not None or self.provider.state(adapter_id) is not LoadState.READY:
                continue
            load = self.provider.prefetch(adapter_id)  # done at once on a host hit (evicted since: queued)
            if load.done() and load.exception() is None:
                weights = cast(LoRAWeights, load.result())
                if self.slots.has_free_slot(weights.rank):
                    self._activate(adapter_id, weights, (), self.copies)
                    staged.append(adapter_id)
        return staged

    def _activate(self, adapter_id: str, weights: LoRAWeights, in_use: Collection[str],
                  copies: AdapterCopyStream | None) -> int:
        """Copy it into a slot, evicting an idle adapter that is neither in use nor pinned if need be."""
        return self.slots.activate(adapter_id, weights, {*in_use, *self.pinned}, copies)

    # --- the operator's actions -----------------------------------------------------------------
    def apply(self, message: ControlAdapter, in_use: Collection[str]) -> None:
        if message.done.done():
            return
        try:
            self._apply(message, in_use)
        except (BadRequest, Overloaded) as exc:
            message.done.set_exception(exc)

    def _apply(self, m: ControlAdapter, in_use: Collection[str]) -> None:
        a, store = m.adapter_id, cast(Any, self.provider)
        match m.action:
            case AdapterAction.PIN:
                if a not in self.pinned and len(self.pinned) + 2 > self.slots.num_slots:
                    raise Overloaded("pinning it would leave no device slot for other adapters",
                                     adapter=a, num_slots=self.slots.num_slots)
                if hasattr(store, "pin"):
                    store.pin(a)
                self.pinned.add(a)
                self._to_device(m, in_use)
            case AdapterAction.UNPIN:
                self._unpin(a)
                m.done.set_result(None)
            case AdapterAction.PRELOAD:
                self._to_device(m, in_use)
            case AdapterAction.EVICT:
                if a in in_use:
                    raise BadRequest("a request of this adapter is running: evict it when idle", adapter=a)
                self._unpin(a)
                self.slots.remove(a)
                m.done.set_result(None)

    def _unpin(self, adapter_id: str) -> None:
        self.pinned.discard(adapter_id)
        store = cast(Any, self.provider)
        if hasattr(store, "unpin"):
            store.unpin(adapter_id)

    def _to_device(self, m: ControlAdapter, in_use: Collection[str]) -> None:
        """Into a slot once in host memory; until then, the message comes back when the load ends."""
        load = self.provider.prefetch(m.adapter_id)
        if not load.done():
            load.add_done_callback(lambda _: self.post(m))
            return
        if load.exception() is not None:
            m.done.set_exception(load.exception())
            return
        self._activate(m.adapter_id, self.provider.get(m.adapter_id), in_use, None)
        m.done.set_result(None)

