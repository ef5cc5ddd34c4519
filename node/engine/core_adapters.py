"""The adapters the engine cores know, as seen from the API process.

The weights live in each core's own adapter store; what the API holds is the list of registrations
(id -> URI and registered sha256), which it sends to every core, again to a core started after a
crash, and answers `state` from: UNKNOWN (never registered, or removed) or COLD (registered: where
it is resident is the cores' business). This is what the catalog needs (`AdapterRegistrar`).
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import TYPE_CHECKING

from node.engine import wire
from node.errors import AdapterFormatError
from node.lora.content_hash import sha256_from_hex
from node.lora.provider import AdapterSource, LoadState

if TYPE_CHECKING:
    from node.engine.core_client import CoreClient


class CoreAdapters:
    def __init__(self, client: CoreClient, validates_hash: bool) -> None:
        self.client, self.validates_hash = client, validates_hash
        self._sources: dict[str, AdapterSource] = {}
        self._lock = threading.Lock()

    def register(self, adapter_id: str, source: AdapterSource) -> None:
        if self.validates_hash:  # refused here, as the store in the core would refuse it
            try:
                sha256_from_hex(source.sha256)
            except ValueError as e:
                raise AdapterFormatError(f"registered sha256 of {adapter_id} is not 32 bytes of hex: {e}",
                                         adapter=adapter_id, sha256=source.sha256) from e
        with self._lock:
            self._sources[adapter_id] = source
        self.client.broadcast(_registration(adapter_id, source))

    def unregister(self, adapter_id: str) -> None:
        """Forget it here and in every core (its requests there finish with "abort")."""
        with self._lock:
            self._sources.pop(adapter_id, None)
        self.client.broadcast(wire.RemoveAdapter(adapter_id))

    def prefetch(self, adapter_id: str) -> Future[object]:
        """Start loading it into host memory on the core its requests go to first. The load happens in
        that core: the future returned is done at once (the request that needs it waits there)."""
        self.client.send_to_home(adapter_id, wire.PrefetchAdapter(adapter_id))
        done: Future[object] = Future()
        done.set_result(None)
        return done

    def chat_template(self, adapter_id: str) -> str | None:
        """An adapter's own chat template is read where its files are, in the core: not carried to the API
        yet, so with the engine out of process chat renders with the base model's template."""
        return None

    def error(self, adapter_id: str) -> Exception | None:
        return None  # a failed load is reported by the request that met it (the core's error crosses)

    def state(self, adapter_id: str) -> LoadState:
        with self._lock:
            return LoadState.COLD if adapter_id in self._sources else LoadState.UNKNOWN

    def registrations(self) -> list[wire.RegisterAdapter]:
        with self._lock:
            return [_registration(a, s) for a, s in self._sources.items()]


def _registration(adapter_id: str, source: AdapterSource) -> wire.RegisterAdapter:
    return wire.RegisterAdapter(adapter_id, source.uri, source.sha256, source.is_pinned)
