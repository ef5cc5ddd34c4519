"""The worker half of the tiered adapter store (`node.lora.store`): its load jobs, from start to settlement.

A `LoadJob` is one adapter's load in flight. `StoreLoader.request` starts one on a worker pool (local
sources and disk copies on the load pool, HTTP fetches on the fetch pool, so a slow source never delays
an adapter already on disk) or joins the one running; `complete` runs one on the calling thread. A job
reads the registered bytes from the disk cache or fetches them, checks the sha256 on the very bytes it
parses, and settles: into host memory, or into a failure recorded for `retry_after_s`. All of it shares
the store's state (`StoreState`) under the store's one lock, held only for dictionary updates.
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
from typing import Generic, TypeVar

import httpx

from node.errors import AdapterFormatError, AdapterIntegrityError, AdapterNotFound, AdapterTooLarge
from node.lora.adapter_files import AdapterFiles
from node.lora.disk_cache import DiskCache, disk_key
from node.lora.host_cache import HostCache
from node.lora.provider import AdapterSource
from node.lora.source import FetchLimits, check_adapter_files, fetch_adapter, shown_uri
from node.lora.store_config import StoreConfig
from node.lora.store_metrics import MetricsRecorder
from node.protocol.hexstr import to_hex

W = TypeVar("W")
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Registration:
    source: AdapterSource
    digest: bytes  # the registered sha256
    key: str = field(init=False)  # the disk cache entry: the digest's hex and a tag of the URI

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", disk_key(self.digest, self.source.uri))


class LoadJob(Generic[W]):
    """A load in flight. `future`: what its waiters wait on; a load run inline by `get` gets one only
    when another caller joins it (running from the start: nobody can cancel it)."""

    __slots__ = ("adapter_id", "future", "is_leased", "reg")

    def __init__(self, adapter_id: str, reg: Registration, is_leased: bool, future: Future[W] | None) -> None:
        self.adapter_id, self.reg, self.future = adapter_id, reg, future
        self.is_leased = is_leased  # a disk cache copy is there, held against eviction until the load ends


@dataclass(frozen=True)
class Failure:
    error: Exception
    at: float  # time.monotonic()


@dataclass
class StoreState(Generic[W]):
    """The store's tiers and bookkeeping; `lock` guards the dictionaries and the host cache."""

    config: StoreConfig
    host: HostCache[W]
    disk: DiskCache
    metrics: MetricsRecorder
    lock: threading.Lock = field(default_factory=threading.Lock)
    registered: dict[str, Registration] = field(default_factory=dict)
    inflight: dict[str, LoadJob[W]] = field(default_factory=dict)
    failures: dict[str, Failure] = field(default_factory=dict)
    templates: dict[str, str | None] = field(default_factory=dict)  # an adapter's own chat template, at its last load

    # --- under the lock --------------------------------------------------------------------------
    def registration(self, adapter_id: str) -> Registration:
        reg = self.registered.get(adapter_id)
        if reg is None:
            raise AdapterNotFound(f"adapter {adapter_id} is not registered", adapter=adapter_id)
        return reg

    def host_hit(self, adapter_id: str) -> W | None:
        """Its weights if host memory holds them (a hit, counted), else None; AdapterNotFound if the adapter
        is not registered. How `get` and `request` begin."""
        self.registration(adapter_id)
        weights = self.host.get(adapter_id)
        if weights is not None:
            self.metrics.count("host", "hits")
        return weights

    def recent_failure(self, adapter_id: str) -> Exception | None:
        """The error of this adapter's last load if it failed under `retry_after_s` ago (else forgotten)."""
        failure = self.failures.get(adapter_id)
        if failure is not None and time.monotonic() - failure.at < self.config.retry_after_s:
            return failure.error
        self.failures.pop(adapter_id, None)
        return None

    def new_job(self, adapter_id: str, future: Future[W] | None) -> LoadJob[W]:
        """A load to start, in flight from now on (its disk copy, if any, leased until it ends)."""
        self.metrics.count("host", "misses")
        reg = self.registration(adapter_id)
        job = LoadJob(adapter_id, reg, self.disk.lease(reg.key), future)
        self.inflight[adapter_id] = job
        return job


def join(job: LoadJob[W]) -> Future[W]:
    """The future of a load in flight, made now (running: nobody can cancel it) for a load run inline."""
    if job.future is None:
        job.future = Future()
        job.future.set_running_or_notify_cancel()
    return job.future


class StoreLoader(Generic[W]):
    """Runs the store's load jobs: on its worker pools, or on the thread that calls `complete`."""

    def __init__(self, state: StoreState[W], parse: Callable[[AdapterFiles], W], nbytes: Callable[[W], int]) -> None:
        config = state.config
        self._state, self._parse, self._nbytes = state, parse, nbytes
        self._limits = FetchLimits(max_bytes=min(config.max_download_bytes, config.max_disk_bytes),
                                   connect_timeout_s=config.http_connect_timeout_s,
                                   read_timeout_s=config.http_timeout_s, deadline_s=config.fetch_deadline_s)
        self._client = httpx.Client(follow_redirects=True,
                                    limits=httpx.Limits(max_connections=config.num_fetch_workers))
        self._load_pool = ThreadPoolExecutor(config.num_load_workers, thread_name_prefix="adapter-load")
        self._fetch_pool = ThreadPoolExecutor(config.num_fetch_workers, thread_name_prefix="adapter-fetch")

    def request(self, adapter_id: str) -> Future[W]:
        """The future for this adapter: done (host hit, recent failure), joined, or new, its job sent to
        a worker pool: local sources and disk copies to the load pool, HTTP fetches to the fetch pool."""
        state = self._state
        with state.lock:
            weights = state.host_hit(adapter_id)
            if weights is not None:
                return _ready(weights)
            if adapter_id in state.inflight:
                return join(state.inflight[adapter_id])
            error = state.recent_failure(adapter_id)
            if error is not None:
                return _failed(error)
            future: Future[W] = Future()
            job = state.new_job(adapter_id, future)
            future.add_done_callback(lambda f: self._on_cancel(job) if f.cancelled() else None)
            is_remote = job.reg.source.uri.startswith(("http://", "https://"))
            pool = self._fetch_pool if not job.is_leased and is_remote else self._load_pool
            pool.submit(self._run, job)
            return future

    def complete(self, job: LoadJob[W]) -> W:
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

    def close(self) -> None:
        """Stop the workers (loads still queued fail with CancelledError) and close the HTTP client."""
        with self._state.lock:
            queued = [job.future for job in self._state.inflight.values() if job.future is not None]
        for future in queued:
            future.cancel()  # only those no worker has started
        self._fetch_pool.shutdown(wait=True, cancel_futures=True)
        self._load_pool.shutdown(wait=True, cancel_futures=True)
        self._client.close()

    # --- on a worker thread (or a `get`'s) -------------------------------------------------------
    def _run(self, job: LoadJob[W]) -> None:
        assert job.future is not None
        if not job.future.set_running_or_notify_cancel():
            return  # cancelled while queued: `_on_cancel` has cleaned up
        with contextlib.suppress(Exception):  # a worker boundary: the error is the future's, for its waiters
            self.complete(job)

    def _load(self, job: LoadJob[W]) -> tuple[W, int]:
        state, config = self._state, self._state.config
        adapter_id, reg = job.adapter_id, job.reg
        files, started = self._good_copy(adapter_id, reg, job.is_leased)
        try:
            template = files.chat_template
            with state.lock:
                state.templates[adapter_id] = template
            files.check()
            weights = self._parse(files)
            size = self._nbytes(weights)
            if not config.verify_every_load:  # its next loads check nothing again
                state.disk.vet(reg.key)  # after a restart too
                state.disk.remember(reg.key, files)  # and read only the tensor bytes
            state.metrics.loaded("disk", time.monotonic() - started)
        finally:
            state.disk.release(reg.key)
        if size > config.max_host_bytes:
            raise AdapterTooLarge(f"adapter {adapter_id} takes {size} bytes in host memory, over the "
                                  f"{config.max_host_bytes}-byte budget",
                                  adapter=adapter_id, nbytes=size, max_bytes=config.max_host_bytes)
        return weights, size

    def _good_copy(self, adapter_id: str, reg: Registration, is_leased: bool,
                   ) -> tuple[AdapterFiles, float]:
        """The registered bytes, read once from a leased disk folder (the cached one if still good, else
        fetched now), and when the disk step began. The hash is checked on the very bytes returned."""
        disk, metrics = self._state.disk, self._state.metrics
        started = time.monotonic()
        if is_leased:
            files, why = self._cached_copy(reg.key, reg.digest)
            if files is not None:
                metrics.count("disk", "hits")
                disk.touch(reg.key)
                return files, started
            logger.warning("disk copy of adapter %s is bad (%s): deleting and fetching again", adapter_id, why)
            disk.release(reg.key)
            disk.discard(reg.key)
        metrics.count("disk", "misses")
        self._fetch(adapter_id, reg)  # into the entry reg.key
        started = time.monotonic()  # the fetch is timed on its own; the disk step starts now
        files, why = self._cached_copy(reg.key, reg.digest)
        if files is None:  # changed on disk since the fetch checked it
            disk.release(reg.key)
            raise AdapterIntegrityError(f"adapter {adapter_id}: its fresh disk copy is bad ({why}): refused",
                                        adapter=adapter_id, expected=to_hex(reg.digest), why=why)
        return files, started

    def _cached_copy(self, key: str, digest: bytes) -> tuple[AdapterFiles | None, str]:
        """A disk cache copy ready to parse, or None and why not. Verified when it entered the cache,
        it is trusted (header checked, not hashed; after its first load, not even read again: `recall`)
        unless `verify_every_load` asks to hash it again."""
        disk = self._state.disk
        try:
            if not self._state.config.verify_every_load:
                files = disk.recall(key) or AdapterFiles.open(disk.root / key, disk.is_vetted(key))
                files.check()
                return files, ""
            files = AdapterFiles.read(disk.root / key)
            actual = files.sha256()
        except (OSError, AdapterFormatError) as e:  # deleted or unreadable: as good as corrupted
            return None, str(e) or type(e).__name__
        if actual != digest:
            return None, f"hashes to {to_hex(actual)}, not {to_hex(digest)}"
        return files, ""

    def _fetch(self, adapter_id: str, reg: Registration) -> Path:
        disk, metrics = self._state.disk, self._state.metrics
        started = time.monotonic()
        temp = disk.new_temp()
        try:
            actual = fetch_adapter(reg.source.uri, temp, self._limits, self._client)
            if actual != reg.digest:
                raise _mismatch(adapter_id, reg, actual)
            check_adapter_files(temp)
            folder, num_evicted = disk.commit(temp, reg.key)
        except Exception:
            metrics.count("source", "misses")
            raise
        finally:
            shutil.rmtree(temp, ignore_errors=True)  # the bad copy; gone already after a commit
        metrics.count("source", "hits")
        metrics.count("disk", "evictions", num_evicted)
        metrics.loaded("source", time.monotonic() - started, sum(p.stat().st_size for p in folder.iterdir()))
        logger.info("fetched adapter %s from %s in %.3fs", adapter_id, shown_uri(reg.source.uri),
                    time.monotonic() - started)
        return folder

    def _on_cancel(self, job: LoadJob[W]) -> None:
        """A waiter (or `close`) cancelled a load no worker had started: forget it at once."""
        if job.is_leased:
            self._state.disk.release(job.reg.key)
        self._settle(job)

    def _settle(self, job: LoadJob[W], weights: W | None = None, size: int = 0,
                error: Exception | None = None) -> Future[W] | None:
        """Record the load's outcome; returns the future to resolve with it, if anyone waits on one."""
        state = self._state
        with state.lock:
            future, job.future = job.future, None  # the future's cancel callback holds the job: no cycle left
            if state.inflight.get(job.adapter_id) is not job:
                return future  # unregistered or re-registered meanwhile: the result belongs to no one
            del state.inflight[job.adapter_id]
            if error is not None:
                logger.warning("adapter %s failed to load: %s", job.adapter_id, error)
                state.failures[job.adapter_id] = Failure(error, time.monotonic())
            elif weights is not None:
                evicted = state.host.put(job.adapter_id, weights, size)
                state.metrics.count("host", "evictions", len(evicted))
            return future


def _mismatch(adapter_id: str, reg: Registration, actual: bytes) -> AdapterIntegrityError:
    return AdapterIntegrityError(
        f"adapter {adapter_id} at {shown_uri(reg.source.uri)} hashes to {to_hex(actual)}, "
        f"registered {to_hex(reg.digest)}: refused",
        adapter=adapter_id, expected=to_hex(reg.digest), actual=to_hex(actual), uri=shown_uri(reg.source.uri))


def _ready(weights: W) -> Future[W]:
    future: Future[W] = Future()
    future.set_result(weights)
    return future


def _failed(error: Exception) -> Future[W]:
    future: Future[W] = Future()
    future.set_exception(error)
    return future
