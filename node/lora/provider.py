"""The port between the engine and wherever adapters come from.

The engine asks a provider for an adapter's parsed host-memory weights by id. The simplest provider
holds adapters added from local folders; the tiered store (`node.lora.store`) fetches them from
their registered URI, verifies the sha256, caches them on disk and in host memory, and loads in the
background so that the scheduler never waits on a load.
"""

from __future__ import annotations

import enum
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

W_co = TypeVar("W_co", covariant=True)


class Holds(Protocol):
    """Where a provider keeps adapter ids (a dict, a set, its host cache)."""

    def __contains__(self, adapter_id: str, /) -> bool: ...


class LoadState(enum.Enum):
    UNKNOWN = "unknown"  # never registered with this provider
    COLD = "cold"  # registered, not in host memory
    LOADING = "loading"  # a background load is running
    READY = "ready"  # in host memory: `get` returns at once
    FAILED = "failed"  # the last load failed; `error` says why

    @classmethod
    def of(cls, adapter_id: str, *, registered: Holds, ready: Holds, loading: Holds,
           failed: Holds) -> LoadState:
        """An adapter's state from where a provider keeps it: one precedence for every provider (the
        store, the in-memory one, and the engine cores' registrations seen from the API)."""
        if adapter_id not in registered:
            return cls.UNKNOWN
        if adapter_id in ready:
            return cls.READY
        if adapter_id in loading:
            return cls.LOADING
        return cls.FAILED if adapter_id in failed else cls.COLD


@dataclass(frozen=True)
class AdapterSource:
    """Where an adapter comes from, as plain values the service hands to the engine."""

    uri: str  # a local path, file://..., or http(s)://...
    sha256: str  # the registered weights hash (0x-hex or bare hex), checked before parsing
    is_pinned: bool = False  # keep in host memory and device slots whatever the traffic


class AdapterRegistrar(Protocol):
    """Where the service registers adapters (the engine's provider, or the engine cores' registrations)."""

    def register(self, adapter_id: str, source: AdapterSource) -> None: ...

    def unregister(self, adapter_id: str) -> None: ...

    def state(self, adapter_id: str) -> LoadState: ...

    def prefetch(self, adapter_id: str) -> Future[Any]:
        """Done when the adapter is loaded (Any: the store's Future[W] is not a Future[object]: see below)."""
        ...

    def chat_template(self, adapter_id: str) -> str | None: ...

    def error(self, adapter_id: str) -> Exception | None: ...


class AdapterProvider(Protocol[W_co]):
    def register(self, adapter_id: str, source: AdapterSource) -> None: ...

    def unregister(self, adapter_id: str) -> None: ...

    def get(self, adapter_id: str) -> W_co:
        """The parsed weights, loading them now if needed. Raises an AdapterError subclass."""
        ...

    def prefetch(self, adapter_id: str) -> Future[Any]:
        """Start loading in the background (deduplicated); the future holds the weights or the error.
        (Any: a Future is invariant, so neither Future[object] nor Future[W_co] admits the store's Future[W].)"""
        ...

    def state(self, adapter_id: str) -> LoadState: ...

    def error(self, adapter_id: str) -> Exception | None:
        """Why the last load of this adapter failed, while its state is FAILED."""
        ...

    def chat_template(self, adapter_id: str) -> str | None:
        """The adapter's own chat template once it has been loaded (a plain string, never rendered here);
        None when its folder has none."""
        ...
