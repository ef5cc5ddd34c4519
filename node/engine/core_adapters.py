"""The adapters the engine cores know, as seen from the API process.

The weights live in each core's own adapter store; what the API holds is the list of registrations
(id -> URI and registered sha256), which it sends to every core, again to a core started after a
crash, and what the cores said about each adapter's load: its own chat template once a core loaded
it, or why its load failed. `prefetch` asks a core to load an adapter and its future is done when
that core answers (`AdapterLoaded`): with the chat template read from the adapter's folder (the API
renders chat with it), or with the error the core's store met (a sha256 mismatch, a source that does
not answer), which refuses the request before any money is held, as the store does in process.

An adapter one core loaded is not asked about again (its files are content-addressed, so its
template cannot change); a failed one answers its error for the store's `retry_after_s`, then the
next prefetch asks a core again. A core that dies fails the prefetches it was answering with
`Unavailable` (a node fault, not the adapter's). `state` is UNKNOWN (never registered, or removed),
FAILED (its last load failed), LOADING (a core is loading it), READY (a core loaded it) or COLD.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING

from node.engine import wire
from node.errors import AdapterFormatError, NodeError, Unavailable
from node.lora.content_hash import sha256_from_hex
from node.lora.manager import AdapterAction
from node.lora.provider import AdapterSource, LoadState

if TYPE_CHECKING:
    from node.engine.core_client import CoreClient


@dataclass(frozen=True)
class _Failure:
    error: Exception
    at: float


@dataclass(frozen=True)
class _Load:
    core: int
    future: Future[object]


class CoreAdapters:
    def __init__(self, client: CoreClient, validates_hash: bool, retry_after_s: float = 1.0) -> None:
        self.client, self.validates_hash, self.retry_after_s = client, validates_hash, retry_after_s
        self._sources: dict[str, AdapterSource] = {}
        self._templates: dict[str, str | None] = {}  # loaded by some core: its own chat template
        self._failures: dict[str, _Failure] = {}
        self._loads: dict[str, _Load] = {}  # asked of a core, not answered yet
        self._pins: set[str] = set()  # the operator's pins the cores applied: given again to a restarted core
        self._lock = threading.Lock()

    def register(self, adapter_id: str, source: AdapterSource) -> None:
        if self.validates_hash:  # refused here, as the store in the core would refuse it
            try:
                sha256_from_hex(source.sha256)
            except ValueError as e:
                raise AdapterFormatError(f"registered sha256 of {adapter_id} is not 32 bytes of hex: {e}",
                                         adapter=adapter_id, sha256=source.sha256) from e
        with self._lock:
            changed = self._sources.get(adapter_id) != source
            if changed:
                self._forget(adapter_id)
            self._sources[adapter_id] = source
        if changed:
            self.client.forget_warm(adapter_id)
        self.client.broadcast(_registration(adapter_id, source))

    def unregister(self, adapter_id: str) -> None:
        """Forget it here and in every core (its requests there finish with "abort")."""
        with self._lock:
            self._sources.pop(adapter_id, None)
            self._pins.discard(adapter_id)
            load = self._forget(adapter_id)
        if load is not None:
            load.future.cancel()
        self.client.forget_warm(adapter_id)
        self.client.broadcast(wire.RemoveAdapter(adapter_id))

    def prefetch(self, adapter_id: str) -> Future[object]:
        """Have a core (the one its requests go to first) load it; done when that core has, with the
        adapter's error if the load failed."""
        with self._lock:
            done: Future[object] = Future()
            if adapter_id in self._templates:
                done.set_result(None)
                return done
            failure = self._failures.get(adapter_id)
            if failure is not None and time.monotonic() - failure.at < self.retry_after_s:
                done.set_exception(failure.error)
                return done
            if adapter_id in self._loads:
                return self._loads[adapter_id].future
            self._failures.pop(adapter_id, None)
            try:  # sent under the lock: its answer, on the receiver thread, finds the load waiting
                core = self.client.send_prefetch(adapter_id)
            except NodeError as e:  # no core up, or its queue is full
                done.set_exception(e)
                return done
            self._loads[adapter_id] = _Load(core, done)
            return done

    def loaded(self, message: wire.AdapterLoaded) -> None:
        """A core's answer to a prefetch (the client's receiver thread)."""
        with self._lock:
            load = self._loads.get(message.adapter_id)
            if load is None or load.core != message.core:
                return  # unregistered meanwhile, or an answer nobody asked this core for
            del self._loads[message.adapter_id]
            if message.error is None:
                self._templates[message.adapter_id] = message.chat_template
            else:
                self._failures[message.adapter_id] = _Failure(message.error, time.monotonic())
        if message.error is None:
            load.future.set_result(None)
        else:
            load.future.set_exception(message.error)

    def core_exited(self, core: int) -> None:
        """Fail the prefetches that core was answering: the node's fault, not the adapter's."""
        with self._lock:
            gone = [(a, load) for a, load in self._loads.items() if load.core == core]
            for adapter_id, _ in gone:
                del self._loads[adapter_id]
        for adapter_id, load in gone:
            if not load.future.done():
                load.future.set_exception(Unavailable("the engine core stopped while loading the adapter",
                                                      adapter=adapter_id))

    def chat_template(self, adapter_id: str) -> str | None:
        """The adapter's own chat template once a core has loaded it (None: it has none, or not loaded yet:
        prefetch it first)."""
        with self._lock:
            return self._templates.get(adapter_id)

    def error(self, adapter_id: str) -> Exception | None:
        with self._lock:
            failure = self._failures.get(adapter_id)
            return failure.error if failure is not None else None

    def state(self, adapter_id: str) -> LoadState:
        with self._lock:  # loaded, loading and failed exclude each other here (prefetch, loaded)
            return LoadState.of(adapter_id, registered=self._sources, ready=self._templates, loading=self._loads,
                                failed=self._failures)

    def controlled(self, adapter_id: str, action: AdapterAction, done: Future[None]) -> None:
        """An operator's action the cores answered (`done`); once every one applied it, pins are kept for
        cores started later."""
        if done.cancelled() or done.exception() is not None:
            return
        with self._lock:
            if action is AdapterAction.PIN and adapter_id in self._sources:
                self._pins.add(adapter_id)
            elif action in (AdapterAction.UNPIN, AdapterAction.EVICT):  # evict unpins too (LoRAManager)
                self._pins.discard(adapter_id)

    def pins(self) -> list[str]:
        with self._lock:
            return sorted(self._pins)

    def registrations(self) -> list[wire.RegisterAdapter]:
        with self._lock:
            return [_registration(a, s) for a, s in self._sources.items()]

    def _forget(self, adapter_id: str) -> _Load | None:
        """Under the lock: what was known of an adapter's loads."""
        self._templates.pop(adapter_id, None)
        self._failures.pop(adapter_id, None)
        return self._loads.pop(adapter_id, None)


def _registration(adapter_id: str, source: AdapterSource) -> wire.RegisterAdapter:
    return wire.RegisterAdapter(adapter_id, source.uri, source.sha256, source.is_pinned)
