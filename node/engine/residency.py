"""What the operator asks of an adapter's residency (`loranode adapter pin|unpin|preload|evict`), applied
on the engine's step thread, where the device slots are only ever touched.

- pin: keep it in host memory and on disk (the adapter store's pin) and, once in a device slot, never
  evict it for another adapter; it is copied in now. At least one slot stays unpinned for traffic.
- unpin: back to least-recently-used everywhere.
- preload: load it into host memory and copy it into a device slot (evicting an idle, unpinned
  adapter if none is free), so that its next request finds it there.
- evict: out of its device slot and unpinned; refused while a request of it runs.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Collection
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, cast

from node.errors import BadRequest, Overloaded
from node.lora.adapter import LoRAWeights
from node.lora.provider import AdapterProvider
from node.lora.slots import LoRASlotPools


class AdapterAction(enum.StrEnum):
    PIN = "pin"
    UNPIN = "unpin"
    PRELOAD = "preload"
    EVICT = "evict"


@dataclass(frozen=True)
class ControlAdapter:
    """An inbox message: `done` is resolved on the step thread when the action took effect."""

    adapter_id: str
    action: AdapterAction
    done: Future[None]


class Residency:
    def __init__(self, provider: AdapterProvider[LoRAWeights], slots: LoRASlotPools,
                 post: Callable[[ControlAdapter], None]) -> None:
        self.provider, self.slots, self.post = provider, slots, post

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
                if a not in self.slots.pinned and len(self.slots.pinned) + 2 > self.slots.num_slots:
                    raise Overloaded("pinning it would leave no device slot for other adapters",
                                     adapter=a, num_slots=self.slots.num_slots)
                if hasattr(store, "pin"):
                    store.pin(a)
                self.slots.pinned.add(a)
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
        self.slots.pinned.discard(adapter_id)
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
        self.slots.activate(m.adapter_id, self.provider.get(m.adapter_id), in_use)
        m.done.set_result(None)
