"""The tiered adapter store: host memory <- disk cache <- registered URI, verified before parsing.

`get` answers from host memory at once or loads; `prefetch` starts a background load (one per
adapter however often it is asked) and returns its future; `state` tells the scheduler, without
blocking, whether an adapter is ready. Loads from the disk cache and fetches from the source run on
separate worker pools, so a slow or stuck HTTP source never delays an adapter that is already on
disk, and a host-memory hit never waits on any load (the lock is held only for dictionary updates).

Integrity: the registered sha256 is checked when an adapter enters the disk cache, which is trusted
afterwards. A fetch hashes the bytes as it writes them into a temp folder; only a copy that hashes to
the registered sha256 (the folder rule of `content_hash`) and parses is flushed and renamed into its
content address. Any other is deleted, never served, counted as a source miss, and the load fails
with AdapterIntegrityError naming both hashes. A load from the cache reads the header and gathers the
tensors unhashed (a copy whose header broke is fetched again); the weights are checked finite by an
entry's first load only (it vets the entry). `verify_every_load` hashes and checks every load (a copy
that no longer hashes right is fetched again).

Failures are per adapter: the state turns FAILED with the error, other adapters are untouched, and
a later get/prefetch (after `retry_after_s`) tries again. The loads themselves, from start to settlement,
are `node.lora.store_loader`'s.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from types import TracebackType
from typing import Generic, TypeVar

from node.errors import AdapterFormatError
from node.lora.adapter_files import AdapterFiles
from node.lora.content_hash import sha256_from_hex
from node.lora.disk_cache import DiskCache
from node.lora.host_cache import HostCache
from node.lora.provider import AdapterSource, LoadState
from node.lora.store_config import StoreConfig
from node.lora.store_loader import Registration, StoreLoader, StoreState, join
from node.lora.store_metrics import MetricsRecorder, StoreMetrics

W = TypeVar("W")
__all__ = ["AdapterStore", "StoreConfig"]


class AdapterStore(Generic[W]):
    """Implements `AdapterProvider[W]` over a host LRU, a disk cache and the registered URIs."""

    def __init__(self, config: StoreConfig, parse: Callable[[AdapterFiles], W],
                 nbytes: Callable[[W], int]) -> None:
        self.config = config
        self._state: StoreState[W] = StoreState(config, HostCache(config.max_host_bytes),
                                                DiskCache(Path(config.cache_dir), config.max_disk_bytes),
                                                MetricsRecorder(config.num_recent_samples))
        self._pinned: set[str] = set()
        self._loader = StoreLoader(self._state, parse, nbytes)

    # --- the provider port ---------------------------------------------------------------------
    def register(self, adapter_id: str, source: AdapterSource) -> None:
        """Register (or re-register) an adapter; a changed URI or hash drops what was loaded before."""
        try:
            reg = Registration(source, sha256_from_hex(source.sha256))
        except ValueError as e:
            raise AdapterFormatError(f"registered sha256 of {adapter_id} is not 32 bytes of hex: {e}",
                                     adapter=adapter_id, sha256=source.sha256) from e
        with self._state.lock:
            old = self._state.registered.get(adapter_id)
            is_same = old is not None and (old.source.uri, old.digest) == (source.uri, reg.digest)
            if not is_same:
                self._forget(adapter_id)
                self._state.registered[adapter_id] = reg
        if source.is_pinned:
            self.pin(adapter_id)
        elif is_same:
            self.unpin(adapter_id)

    def unregister(self, adapter_id: str) -> None:
        """Forget an adapter and drop it from host memory (its disk copy ages out with the LRU)."""
        with self._state.lock:
            self._forget(adapter_id)

    def get(self, adapter_id: str) -> W:
        """The parsed weights, from host memory at once or after a load. Raises an AdapterError.

        A load that nobody has started yet runs on the calling thread (it blocks anyway, and a hop
        to a worker and back costs two wake-ups), with no future unless another caller joins it.
        One already running is joined.
        """
        state = self._state
        with state.lock:
            weights = state.host_hit(adapter_id)
            if weights is not None:
                return weights
            job = state.inflight.get(adapter_id)
            if job is None:
                error = state.recent_failure(adapter_id)
                if error is not None:
                    raise error
                job = state.new_job(adapter_id, None)
                future = None  # ours to run (a caller joining it meanwhile gets a future we resolve)
            else:
                future = join(job)
        if future is None:
            return self._loader.complete(job)
        return future.result()

    def prefetch(self, adapter_id: str) -> Future[W]:
        """Start loading in the background (deduplicated); the future holds the weights or the error.

        Every caller asking for the same adapter gets the same future: cancelling it (possible only
        while queued) cancels the load for all of them, and the next request starts a new one.
        """
        return self._loader.request(adapter_id)

    def state(self, adapter_id: str) -> LoadState:
        state = self._state
        with state.lock:
            return LoadState.of(adapter_id, registered=state.registered, ready=state.host, loading=state.inflight,
                                failed=state.failures)

    def chat_template(self, adapter_id: str) -> str | None:
        """The adapter's own chat template as its folder had it when it was last loaded (None: it has none,
        or it has not been loaded yet: prefetch it first)."""
        with self._state.lock:
            return self._state.templates.get(adapter_id)

    # --- beyond the port -------------------------------------------------------------------------
    def error(self, adapter_id: str) -> Exception | None:
        """Why the last load of this adapter failed, while its state is FAILED."""
        with self._state.lock:
            failure = self._state.failures.get(adapter_id)
            return failure.error if failure is not None else None

    def use(self, adapter_id: str) -> None:
        """A request used this adapter (its weights from here or from a device slot): the second one keeps
        it in host memory ahead of adapters asked for once (`HostCache`). Never loads."""
        with self._state.lock:
            self._state.host.use(adapter_id)

    def pin(self, adapter_id: str) -> Future[W]:
        """Keep an adapter in host memory and on disk whatever the traffic; loads it now."""
        with self._state.lock:
            reg = self._state.registration(adapter_id)
            if adapter_id not in self._pinned:
                self._pinned.add(adapter_id)
                self._state.host.pin(adapter_id)
                self._state.disk.protect(reg.key)
        return self.prefetch(adapter_id)

    def unpin(self, adapter_id: str) -> None:
        with self._state.lock:
            reg = self._state.registration(adapter_id)
            if adapter_id in self._pinned:
                self._pinned.discard(adapter_id)
                self._state.metrics.count("host", "evictions", len(self._state.host.unpin(adapter_id)))
                self._state.disk.unprotect(reg.key)

    def metrics(self) -> StoreMetrics:
        state = self._state
        with state.lock:
            counts = (len(state.registered), len(self._pinned), len(state.inflight), len(state.failures))
            host_bytes = state.host.nbytes
        return StoreMetrics(host=state.metrics.tier("host", host_bytes),
                            disk=state.metrics.tier("disk", state.disk.nbytes),
                            source=state.metrics.tier("source"), num_registered=counts[0],
                            num_pinned=counts[1], num_loading=counts[2], num_failed=counts[3])

    def host_ids(self) -> list[str]:
        """Adapters in host memory, least recently used first."""
        with self._state.lock:
            return self._state.host.keys()

    def disk_keys(self) -> list[str]:
        """Weights hashes (hex) in the disk cache, least recently used first."""
        return self._state.disk.keys()

    def close(self) -> None:
        """Stop the workers and close the HTTP client; loads still queued fail with CancelledError."""
        self._loader.close()
        self._state.disk.close()

    def __enter__(self) -> AdapterStore[W]:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # --- under the lock --------------------------------------------------------------------------
    def _forget(self, adapter_id: str) -> None:
        state = self._state
        reg = state.registered.pop(adapter_id, None)
        state.inflight.pop(adapter_id, None)  # a load still running settles into nothing
        state.host.pop(adapter_id)
        state.failures.pop(adapter_id, None)
        state.templates.pop(adapter_id, None)
        if adapter_id in self._pinned and reg is not None:
            self._pinned.discard(adapter_id)
            state.host.unpin(adapter_id)
            state.disk.unprotect(reg.key)
