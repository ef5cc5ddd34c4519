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
a later get/prefetch (after `retry_after_s`) tries again.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Generic, TypeVar

import httpx

from node.errors import AdapterFormatError, AdapterIntegrityError, AdapterNotFound, AdapterTooLarge
from node.lora.adapter_files import AdapterFiles
from node.lora.content_hash import sha256_from_hex
from node.lora.disk_cache import DiskCache, disk_key
from node.lora.host_cache import HostCache
from node.lora.provider import AdapterSource, LoadState
from node.lora.source import FetchLimits, check_adapter_files, fetch_adapter, shown_uri
from node.lora.store_config import StoreConfig
from node.lora.store_metrics import MetricsRecorder, StoreMetrics
from node.protocol.hexstr import to_hex

W = TypeVar("W")
logger = logging.getLogger(__name__)
__all__ = ["AdapterStore", "StoreConfig"]


@dataclass(frozen=True)
class _Registration:
    source: AdapterSource
    digest: bytes  # the registered sha256
    key: str = field(init=False)  # the disk cache entry: the digest's hex and a tag of the URI

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", disk_key(self.digest, self.source.uri))


class _Job:
    """A load in flight. `future`: what its waiters wait on; a load run inline by `get` gets one only
    when another caller joins it (running from the start: nobody can cancel it)."""

    __slots__ = ("adapter_id", "future", "is_leased", "reg")

    def __init__(self, adapter_id: str, reg: _Registration, is_leased: bool, future: Future[W] | None) -> None:
        self.adapter_id, self.reg, self.future = adapter_id, reg, future
        self.is_leased = is_leased  # a disk cache copy is there, held against eviction until the load ends


@dataclass(frozen=True)
class _Failure:
    error: Exception
    at: float  # time.monotonic()


class AdapterStore(Generic[W]):
    """Implements `AdapterProvider[W]` over a host LRU, a disk cache and the registered URIs."""

    def __init__(self, config: StoreConfig, parse: Callable[[AdapterFiles], W],
                 nbytes: Callable[[W], int]) -> None:
        self.config = config
        self._parse, self._nbytes = parse, nbytes
        self._lock = threading.Lock()
        self._registered: dict[str, _Registration] = {}
        self._pinned: set[str] = set()
        self._inflight: dict[str, _Job] = {}
        self._failures: dict[str, _Failure] = {}
        self._templates: dict[str, str | None] = {}  # an adapter's own chat template, read at its last load
        self._host: HostCache[W] = HostCache(config.max_host_bytes)
        self._disk = DiskCache(Path(config.cache_dir), config.max_disk_bytes)
        self._metrics = MetricsRecorder(config.num_recent_samples)
        self._limits = FetchLimits(max_bytes=min(config.max_download_bytes, config.max_disk_bytes),
                                   connect_timeout_s=config.http_connect_timeout_s,
                                   read_timeout_s=config.http_timeout_s, deadline_s=config.fetch_deadline_s)
        self._client = httpx.Client(follow_redirects=True,
                                    limits=httpx.Limits(max_connections=config.num_fetch_workers))
        self._load_pool = ThreadPoolExecutor(config.num_load_workers, thread_name_prefix="adapter-load")
        self._fetch_pool = ThreadPoolExecutor(config.num_fetch_workers, thread_name_prefix="adapter-fetch")

    # --- the provider port ---------------------------------------------------------------------
    def register(self, adapter_id: str, source: AdapterSource) -> None:
        """Register (or re-register) an adapter; a changed URI or hash drops what was loaded before."""
        try:
            reg = _Registration(source, sha256_from_hex(source.sha256))
        except ValueError as e:
            raise AdapterFormatError(f"registered sha256 of {adapter_id} is not 32 bytes of hex: {e}",
                                     adapter=adapter_id, sha256=source.sha256) from e
        with self._lock:
            old = self._registered.get(adapter_id)
            is_same = old is not None and (old.source.uri, old.digest) == (source.uri, reg.digest)
            if not is_same:
                self._forget(adapter_id)
                self._registered[adapter_id] = reg
        if source.is_pinned:
            self.pin(adapter_id)
        elif is_same:
            self.unpin(adapter_id)

    def unregister(self, adapter_id: str) -> None:
        """Forget an adapter and drop it from host memory (its disk copy ages out with the LRU)."""
        with self._lock:
            self._forget(adapter_id)

    def get(self, adapter_id: str) -> W:
        """The parsed weights, from host memory at once or after a load. Raises an AdapterError.

        A load that nobody has started yet runs on the calling thread (it blocks anyway, and a hop
        to a worker and back costs two wake-ups), with no future unless another caller joins it.
        One already running is joined.
        """
        with self._lock:
            reg = self._registration(adapter_id)
            weights = self._host.get(adapter_id)
            if weights is not None:
                self._metrics.count("host", "hits")
                return weights
            job = self._inflight.get(adapter_id)
            if job is None:
                error = self._recent_failure(adapter_id)
                if error is not None:
                    raise error
                job = self._new_job(adapter_id, reg, None)
                future = None  # ours to run (a caller joining it meanwhile gets a future we resolve)
            else:
                future = self._join(job)
        if future is None:
            return self._complete(job)
        return future.result()

    def prefetch(self, adapter_id: str) -> Future[W]:
        """Start loading in the background (deduplicated); the future holds the weights or the error.

        Every caller asking for the same adapter gets the same future: cancelling it (possible only
        while queued) cancels the load for all of them, and the next request starts a new one.
        """
        return self._request(adapter_id)

    def state(self, adapter_id: str) -> LoadState:
        with self._lock:
            return LoadState.of(adapter_id, registered=self._registered, ready=self._host, loading=self._inflight,
                                failed=self._failures)

    def chat_template(self, adapter_id: str) -> str | None:
        """The adapter's own chat template as its folder had it when it was last loaded (None: it has none,
        or it has not been loaded yet: prefetch it first)."""
        with self._lock:
            return self._templates.get(adapter_id)

    # --- beyond the port -------------------------------------------------------------------------
    def error(self, adapter_id: str) -> Exception | None:
        """Why the last load of this adapter failed, while its state is FAILED."""
        with self._lock:
            failure = self._failures.get(adapter_id)
            return failure.error if failure is not None else None

    def pin(self, adapter_id: str) -> Future[W]:
        """Keep an adapter in host memory and on disk whatever the traffic; loads it now."""
        with self._lock:
            reg = self._registration(adapter_id)
            if adapter_id not in self._pinned:
                self._pinned.add(adapter_id)
                self._host.pin(adapter_id)
                self._disk.protect(reg.key)
        return self.prefetch(adapter_id)

    def unpin(self, adapter_id: str) -> None:
        with self._lock:
            reg = self._registration(adapter_id)
            if adapter_id in self._pinned:
                self._pinned.discard(adapter_id)
                self._metrics.count("host", "evictions", len(self._host.unpin(adapter_id)))
                self._disk.unprotect(reg.key)

    def metrics(self) -> StoreMetrics:
        with self._lock:
            counts = (len(self._registered), len(self._pinned), len(self._inflight), len(self._failures))
            host_bytes = self._host.nbytes
        return StoreMetrics(host=self._metrics.tier("host", host_bytes),
                            disk=self._metrics.tier("disk", self._disk.nbytes),
                            source=self._metrics.tier("source"), num_registered=counts[0],
                            num_pinned=counts[1], num_loading=counts[2], num_failed=counts[3])

    def host_ids(self) -> list[str]:
        """Adapters in host memory, least recently used first."""
        with self._lock:
            return self._host.keys()

    def disk_keys(self) -> list[str]:
        """Weights hashes (hex) in the disk cache, least recently used first."""
        return self._disk.keys()

    def close(self) -> None:
        """Stop the workers and close the HTTP client; loads still queued fail with CancelledError."""
        with self._lock:
            queued = [job.future for job in self._inflight.values() if job.future is not None]
        for future in queued:
            future.cancel()  # only those no worker has started
        self._fetch_pool.shutdown(wait=True, cancel_futures=True)
        self._load_pool.shutdown(wait=True, cancel_futures=True)
        self._client.close()
        self._disk.close()

    def __enter__(self) -> AdapterStore[W]:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # --- loading (worker threads) ----------------------------------------------------------------
    def _request(self, adapter_id: str) -> Future[W]:
        """The future for this adapter: done (host hit, recent failure), joined, or new, its job sent to
        a worker pool: local sources and disk copies to the load pool, HTTP fetches to the fetch pool."""
        with self._lock:
            reg = self._registration(adapter_id)
            weights = self._host.get(adapter_id)
            if weights is not None:
                self._metrics.count("host", "hits")
                return _done(weights)
            if adapter_id in self._inflight:
                return self._join(self._inflight[adapter_id])
            error = self._recent_failure(adapter_id)
            if error is not None:
                return _done(error=error)
            future: Future[W] = Future()
            job = self._new_job(adapter_id, reg, future)
            future.add_done_callback(lambda f: self._on_cancel(job) if f.cancelled() else None)
            is_remote = reg.source.uri.startswith(("http://", "https://"))
            pool = self._fetch_pool if not job.is_leased and is_remote else self._load_pool
            pool.submit(self._run, job)
            return future

    def _run(self, job: _Job) -> None:
        assert job.future is not None
        if not job.future.set_running_or_notify_cancel():
            return  # cancelled while queued: `_on_cancel` has cleaned up
        with contextlib.suppress(Exception):  # a worker boundary: the error is the future's, for its waiters
            self._complete(job)

    def _complete(self, job: _Job) -> W:
        """Run a job (its future, if it has one, running): settle it and its future, and return the
        weights or raise the error."""
        try:
            weights, size = self._load(job)
        except Exception as e:  # the error belongs to this adapter and its waiters
            future = self._settle(job, error=e)
            if future is not None:
                future.set_exception(e)
            raise
        future = self._settle(job, weights=weights, size=size)
        if future is not None:
            future.set_result(weights)
        return weights

    def _load(self, job: _Job) -> tuple[W, int]:
        adapter_id, reg = job.adapter_id, job.reg
        files, started = self._good_copy(adapter_id, reg, job.is_leased)
        try:
            template = files.chat_template
            with self._lock:
                self._templates[adapter_id] = template
            files.check()
            weights = self._parse(files)
            size = self._nbytes(weights)
            if not self.config.verify_every_load:  # its next loads check nothing again
                self._disk.vet(reg.key)  # after a restart too
                self._disk.remember(reg.key, files)  # and read only the tensor bytes
            self._metrics.loaded("disk", time.monotonic() - started)
        finally:
            self._disk.release(reg.key)
        if size > self.config.max_host_bytes:
            raise AdapterTooLarge(f"adapter {adapter_id} takes {size} bytes in host memory, over the "
                                  f"{self.config.max_host_bytes}-byte budget",
                                  adapter=adapter_id, nbytes=size, max_bytes=self.config.max_host_bytes)
        return weights, size

    def _good_copy(self, adapter_id: str, reg: _Registration, is_leased: bool,
                   ) -> tuple[AdapterFiles, float]:
        """The registered bytes, read once from a leased disk folder (the cached one if still good, else
        fetched now), and when the disk step began. The hash is checked on the very bytes returned."""
        started = time.monotonic()
        if is_leased:
            files, why = self._cached_copy(reg.key, reg.digest)
            if files is not None:
                self._metrics.count("disk", "hits")
                self._disk.touch(reg.key)
                return files, started
            logger.warning("disk copy of adapter %s is bad (%s): deleting and fetching again", adapter_id, why)
            self._disk.release(reg.key)
            self._disk.discard(reg.key)
        self._metrics.count("disk", "misses")
        self._fetch(adapter_id, reg)  # into the entry reg.key
        started = time.monotonic()  # the fetch is timed on its own; the disk step starts now
        files, why = self._cached_copy(reg.key, reg.digest)
        if files is None:  # changed on disk since the fetch checked it
            self._disk.release(reg.key)
            raise AdapterIntegrityError(f"adapter {adapter_id}: its fresh disk copy is bad ({why}): refused",
                                        adapter=adapter_id, expected=to_hex(reg.digest), why=why)
        return files, started

    def _cached_copy(self, key: str, digest: bytes) -> tuple[AdapterFiles | None, str]:
        """A disk cache copy ready to parse, or None and why not. Verified when it entered the cache,
        it is trusted (header checked, not hashed; after its first load, not even read again: `recall`)
        unless `verify_every_load` asks to hash it again."""
        try:
            if not self.config.verify_every_load:
                files = self._disk.recall(key) or AdapterFiles.open(self._disk.root / key, self._disk.is_vetted(key))
                files.check()
                return files, ""
            files = AdapterFiles.read(self._disk.root / key)
            actual = files.sha256()
        except (OSError, AdapterFormatError) as e:  # deleted or unreadable: as good as corrupted
            return None, str(e) or type(e).__name__
        if actual != digest:
            return None, f"hashes to {to_hex(actual)}, not {to_hex(digest)}"
        return files, ""

    def _fetch(self, adapter_id: str, reg: _Registration) -> Path:
        started = time.monotonic()
        temp = self._disk.new_temp()
        try:
            actual = fetch_adapter(reg.source.uri, temp, self._limits, self._client)
            if actual != reg.digest:
                raise self._mismatch(adapter_id, reg, actual)
            check_adapter_files(temp)
            folder, num_evicted = self._disk.commit(temp, reg.key)
        except Exception:
            self._metrics.count("source", "misses")
            raise
        finally:
            shutil.rmtree(temp, ignore_errors=True)  # the bad copy; gone already after a commit
        self._metrics.count("source", "hits")
        self._metrics.count("disk", "evictions", num_evicted)
        self._metrics.loaded("source", time.monotonic() - started, sum(p.stat().st_size for p in folder.iterdir()))
        logger.info("fetched adapter %s from %s in %.3fs", adapter_id, shown_uri(reg.source.uri),
                    time.monotonic() - started)
        return folder

    def _on_cancel(self, job: _Job) -> None:
        """A waiter (or `close`) cancelled a load no worker had started: forget it at once."""
        if job.is_leased:
            self._disk.release(job.reg.key)
        self._settle(job)

    def _settle(self, job: _Job, weights: W | None = None, size: int = 0,
                error: Exception | None = None) -> Future[W] | None:
        """Record the load's outcome; returns the future to resolve with it, if anyone waits on one."""
        with self._lock:
            future, job.future = job.future, None  # the future's cancel callback holds the job: no cycle left
            if self._inflight.get(job.adapter_id) is not job:
                return future  # unregistered or re-registered meanwhile: the result belongs to no one
            del self._inflight[job.adapter_id]
            if error is not None:
                logger.warning("adapter %s failed to load: %s", job.adapter_id, error)
                self._failures[job.adapter_id] = _Failure(error, time.monotonic())
            elif weights is not None:
                evicted = self._host.put(job.adapter_id, weights, size)
                self._metrics.count("host", "evictions", len(evicted))
            return future

    # --- under the lock --------------------------------------------------------------------------
    def _registration(self, adapter_id: str) -> _Registration:
        reg = self._registered.get(adapter_id)
        if reg is None:
            raise AdapterNotFound(f"adapter {adapter_id} is not registered", adapter=adapter_id)
        return reg

    def _recent_failure(self, adapter_id: str) -> Exception | None:
        """The error of this adapter's last load if it failed under `retry_after_s` ago (else forgotten)."""
        failure = self._failures.get(adapter_id)
        if failure is not None and time.monotonic() - failure.at < self.config.retry_after_s:
            return failure.error
        self._failures.pop(adapter_id, None)
        return None

    def _new_job(self, adapter_id: str, reg: _Registration, future: Future[W] | None) -> _Job:
        """A load to start, in flight from now on (its disk copy, if any, leased until it ends)."""
        self._metrics.count("host", "misses")
        job = _Job(adapter_id, reg, self._disk.lease(reg.key), future)
        self._inflight[adapter_id] = job
        return job

    @staticmethod
    def _join(job: _Job) -> Future[W]:
        """The future of a load in flight, made now (running: nobody can cancel it) for a load run inline."""
        if job.future is None:
            job.future = Future()
            job.future.set_running_or_notify_cancel()
        return job.future

    def _forget(self, adapter_id: str) -> None:
        reg = self._registered.pop(adapter_id, None)
        self._inflight.pop(adapter_id, None)  # a load still running settles into nothing
        self._host.pop(adapter_id)
        self._failures.pop(adapter_id, None)
        self._templates.pop(adapter_id, None)
        if adapter_id in self._pinned and reg is not None:
            self._pinned.discard(adapter_id)
            self._host.unpin(adapter_id)
            self._disk.unprotect(reg.key)

    @staticmethod
    def _mismatch(adapter_id: str, reg: _Registration, actual: bytes) -> AdapterIntegrityError:
        return AdapterIntegrityError(
            f"adapter {adapter_id} at {shown_uri(reg.source.uri)} hashes to {to_hex(actual)}, "
            f"registered {to_hex(reg.digest)}: refused",
            adapter=adapter_id, expected=to_hex(reg.digest), actual=to_hex(actual), uri=shown_uri(reg.source.uri))


def _done(weights: W | None = None, error: Exception | None = None) -> Future[W]:
    future: Future[W] = Future()
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(weights)  # type: ignore[arg-type]
    return future
