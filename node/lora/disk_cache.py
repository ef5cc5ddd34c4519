"""The disk tier: verified adapter folders under `cache_dir/<sha256 hex>-<source tag>/`, an LRU bounded
in bytes.

Entries are addressed by the registered weights hash and the source (a tag of the URI), so two adapter
ids at the same source share one copy, while the same weights registered at another source get their
own: an adapter's chat template files (outside the weights hash) are always its own source's. A copy
is written under `.tmp/`, verified by the store, flushed to disk (fsync: after a crash an entry is
whole or absent, never a verified name over truncated bytes) and renamed into place (atomic: a reader
never sees half a folder); `.tmp/` is emptied at start. So every entry holds verified bytes, and
loads trust it. An evicted or bad copy is renamed under `.trash/` and deleted outside the lock.
An entry whose files were parsed and found servable (finite weights: the first load after its fetch)
is marked vetted, by an empty `.vetted` file beside them, so that later loads, after a restart too,
skip that check as they skip the hash. Last use is kept in the folder's mtime so the LRU order
survives a restart. Entries being read
(leased) and entries of pinned adapters (protected) are never evicted. In-flight downloads under
`.tmp/` are not counted against the budget.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections import Counter, OrderedDict
from pathlib import Path

from node.lora.adapter_files import WEIGHTS_FILE, AdapterFiles
from node.lora.content_hash import ADAPTER_FILES

logger = logging.getLogger(__name__)
_ENTRY_NAME = re.compile(r"^[0-9a-f]{64}-[0-9a-f]{16}$")
_TMP, _TRASH = ".tmp", ".trash"
TOUCH_INTERVAL_S = 60.0
MAX_OPENED_BYTES = 64 << 20  # configs and safetensors headers kept for the next loads of their entries
VETTED_FILE = ".vetted"  # an entry's mark: its files were parsed and found servable
MAX_OPEN_FILES = 256  # weights files of remembered entries kept open: their loads look up no path


def disk_key(digest: bytes, uri: str) -> str:
    """The entry of the adapter with weights hash `digest` fetched from `uri`."""
    return f"{digest.hex()}-{hashlib.sha256(uri.encode()).hexdigest()[:16]}"


class DiskCache:
    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, int] = OrderedDict()  # sha hex -> bytes, least recently used first
        self._leases: Counter[str] = Counter()
        self._protected: Counter[str] = Counter()
        self._nbytes = 0
        self._touched: dict[str, float] = {}  # key -> when its mtime was last set (time.monotonic())
        self._opened: OrderedDict[str, AdapterFiles] = OrderedDict()  # key -> its files, parsed (`recall`)
        self._opened_bytes = 0
        self._fds: OrderedDict[str, int] = OrderedDict()  # key -> its weights file, open (`recall`)
        self._closing: dict[str, list[int]] = {}  # key -> descriptors to close when its last lease ends
        self._vetted: set[str] = set()
        self._scan()

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def keys(self) -> list[str]:
        """Cached hashes, least recently used first."""
        with self._lock:
            return list(self._entries)

    def lease(self, key: str) -> bool:
        """Whether the entry is cached; if so it is now the most recently used and held against eviction."""
        with self._lock:
            if key not in self._entries:
                return False
            self._entries.move_to_end(key)
            self._leases[key] += 1
        return True

    def touch(self, key: str) -> None:
        """Record the use on disk (the folder's mtime), so that the LRU order survives a restart; at most
        once a minute per entry (the order in memory is exact; a restart keeps it to the minute)."""
        now = time.monotonic()
        if now - self._touched.get(key, -TOUCH_INTERVAL_S) < TOUCH_INTERVAL_S:
            return
        self._touched[key] = now
        with contextlib.suppress(FileNotFoundError):  # deleted behind our back: the reader fetches again
            os.utime(self.root / key)

    def is_vetted(self, key: str) -> bool:
        """Whether the entry's files were parsed and found servable since they entered the cache."""
        return key in self._vetted

    def vet(self, key: str) -> None:
        """Mark the entry's files parsed and found servable, in memory and on disk (not flushed: a mark
        lost in a crash only means one more check)."""
        if key in self._vetted:
            return
        with contextlib.suppress(FileNotFoundError):  # deleted behind our back: the reader fetches again
            os.close(os.open(self.root / key / VETTED_FILE, os.O_WRONLY | os.O_CREAT, 0o644))
            with self._lock:
                if key in self._entries:
                    self._vetted.add(key)

    def remember(self, key: str, files: AdapterFiles) -> None:
        """Keep a leased entry's opened files, parsed (config, header, chat template; `AdapterFiles.again`),
        and its weights file open, for its next loads: the entry's files never change while it is cached.
        Forgotten with the entry (evicted, discarded or committed again); at most MAX_OPENED_BYTES of
        them and MAX_OPEN_FILES open files, least recent first out."""
        nbytes = len(files.config_bytes) + len(files.head)
        with self._lock:
            if nbytes > MAX_OPENED_BYTES or (key in self._opened and key in self._fds):  # kept already
                return
        try:
            fd = os.open(self.root / key / WEIGHTS_FILE, os.O_RDONLY)
        except FileNotFoundError:  # deleted behind our back: the next load fetches again
            return
        with self._lock:
            if key not in self._entries:
                os.close(fd)
                return
            self._forget_opened(key)
            self._opened[key], self._fds[key] = files.again(), fd
            self._opened_bytes += nbytes
            while self._opened_bytes > MAX_OPENED_BYTES:
                self._forget_opened(next(iter(self._opened)))
            while len(self._fds) > MAX_OPEN_FILES:
                self._close_file(next(iter(self._fds)))

    def recall(self, key: str) -> AdapterFiles | None:
        """The entry's files as `remember` kept them (a new handle reading its open weights file, if it
        is still open), if that file still has their size (a truncated copy is opened again, found bad
        and fetched again). Only under a lease on the entry: the file stays open until it ends."""
        with self._lock:
            files = self._opened.get(key)
            if files is None:
                return None
            self._opened.move_to_end(key)
            fd = self._fds.get(key)
            if fd is not None:
                self._fds.move_to_end(key)
        try:
            size = os.fstat(fd).st_size if fd is not None else os.stat(self.root / key / WEIGHTS_FILE).st_size
        except FileNotFoundError:
            return None
        return files.again(fd) if size == files.size else None

    def close(self) -> None:
        """Close the weights files kept open (the store is closing; no load runs)."""
        with self._lock:
            for fd in [*self._fds.values(), *(fd for fds in self._closing.values() for fd in fds)]:
                os.close(fd)
            self._fds.clear()
            self._closing.clear()

    def _forget_opened(self, key: str) -> None:
        files = self._opened.pop(key, None)
        if files is not None:
            self._opened_bytes -= len(files.config_bytes) + len(files.head)
        self._close_file(key)

    def _close_file(self, key: str) -> None:
        """Close the entry's open weights file, once no load holds it (when its last lease ends)."""
        fd = self._fds.pop(key, None)
        if fd is None:
            return
        if self._leases[key]:
            self._closing.setdefault(key, []).append(fd)
        else:
            os.close(fd)

    def release(self, key: str) -> None:
        with self._lock:
            self._leases[key] -= 1
            if self._leases[key] <= 0:
                del self._leases[key]
                for fd in self._closing.pop(key, ()):
                    os.close(fd)

    def protect(self, key: str) -> None:
        with self._lock:
            self._protected[key] += 1

    def unprotect(self, key: str) -> None:
        with self._lock:
            self._protected[key] -= 1
            if self._protected[key] <= 0:
                del self._protected[key]

    def new_temp(self) -> Path:
        path = self.root / _TMP / uuid.uuid4().hex
        path.mkdir(parents=True)
        return path

    def commit(self, temp: Path, key: str) -> tuple[Path, int]:
        """Move a verified temp folder into place, leased; returns it and the number of evictions."""
        size = sum((temp / name).stat().st_size for name in ADAPTER_FILES)
        for path in (*temp.iterdir(), temp):
            _fsync(path)
        with self._lock:
            self._forget_opened(key)  # its chat template may be another now
            if key not in self._entries:
                if (self.root / key).exists():  # an unindexed leftover (a failed eviction)
                    shutil.rmtree(self.root / key)
                os.rename(temp, self.root / key)  # atomic; `temp` is gone afterwards
                self._entries[key] = size
                self._nbytes += size
            self._entries.move_to_end(key)
            self._leases[key] += 1
            victims = self._take_victims()
        _fsync(self.root)  # the rename itself
        self._delete(victims)
        return self.root / key, len(victims)

    def discard(self, key: str) -> None:
        """Delete a copy that turned out bad (it no longer hashes to its name), even if leased."""
        with self._lock:
            size = self._entries.pop(key, None)
            if size is None:
                return
            self._nbytes -= size
            trash = self._to_trash(key)
        self._delete([trash])

    def _take_victims(self) -> list[Path]:
        victims: list[Path] = []
        for key in list(self._entries):
            if self._nbytes <= self.max_bytes:
                break
            if self._leases[key] or self._protected[key]:
                continue
            self._nbytes -= self._entries.pop(key)
            victims.append(self._to_trash(key))
        return victims

    def _to_trash(self, key: str) -> Path:
        self._touched.pop(key, None)
        self._vetted.discard(key)
        self._forget_opened(key)
        trash = self.root / _TRASH / uuid.uuid4().hex
        trash.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(self.root / key, trash)
        except FileNotFoundError:
            logger.warning("disk cache entry %s vanished before eviction", key)
        return trash

    def _delete(self, paths: list[Path]) -> None:
        for path in paths:
            shutil.rmtree(path, ignore_errors=True)

    def _scan(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for leftover in (_TMP, _TRASH):
            shutil.rmtree(self.root / leftover, ignore_errors=True)
        found: list[tuple[float, str, int]] = []
        for path in self.root.iterdir():
            if not (_ENTRY_NAME.match(path.name) and path.is_dir()):
                logger.warning("ignoring %s in the adapter disk cache", path.name)
                continue
            if not all((path / name).is_file() for name in ADAPTER_FILES):
                shutil.rmtree(path, ignore_errors=True)
                continue
            size = sum((path / name).stat().st_size for name in ADAPTER_FILES)
            found.append((path.stat().st_mtime, path.name, size))
            if (path / VETTED_FILE).is_file():
                self._vetted.add(path.name)
        for _mtime, key, size in sorted(found):
            self._entries[key] = size
            self._nbytes += size
        with self._lock:
            victims = self._take_victims()
        self._delete(victims)
        logger.info("adapter disk cache %s: %d entries, %d bytes", self.root, len(self._entries),
                    self._nbytes)


def _fsync(path: Path) -> None:
    """Flush a file's bytes (or a folder's entries) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
