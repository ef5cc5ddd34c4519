"""The adapter store's settings: tier budgets, worker counts, source limits (a frozen, checked value)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from node.errors import ConfigError


@dataclass(frozen=True)
class StoreConfig:
    cache_dir: Path
    max_disk_bytes: int
    max_host_bytes: int
    num_load_workers: int = 2  # disk -> host (hash check + parse), and copies from local sources
    num_fetch_workers: int = 4  # http(s) -> disk
    http_timeout_s: float = 30.0  # the longest silence between two chunks of a download
    http_connect_timeout_s: float = 10.0
    fetch_deadline_s: float = 600.0  # one whole adapter, however fast each chunk comes
    max_download_bytes: int = 1 << 30  # one adapter's two files together, from any source
    retry_after_s: float = 1.0  # a failed adapter answers its error this long before a new try
    num_recent_samples: int = 1024  # load times kept per tier for percentiles
    # hash every load from the disk cache, not only what enters it (a cache directory others can write)
    verify_every_load: bool = False

    def __post_init__(self) -> None:
        for name in ("max_disk_bytes", "max_host_bytes", "num_load_workers", "num_fetch_workers",
                     "max_download_bytes", "num_recent_samples", "http_timeout_s",
                     "http_connect_timeout_s", "fetch_deadline_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"store {name} must be positive", **{name: getattr(self, name)})
        if self.retry_after_s < 0:
            raise ConfigError("store retry_after_s must not be negative", retry_after_s=self.retry_after_s)
