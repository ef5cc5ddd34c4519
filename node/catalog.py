"""Which adapters this node serves: the registry mirror, filtered to this node's base model.

`model` in an OpenAI request is the adapter's registry id (a decimal string). The catalog reads the
mirror (never the chain), refuses adapters for another base model or deprecated ones, and hands the
engine's adapter provider plain values: the URI and the registered sha256. Every paid request goes
through `resolve`, so it is also where a stale mirror stops paid work: past `max_mirror_lag_s` without
the indexer moving it (the RPC unreachable, the indexer down), escrow and lineage may be out of date,
and requests are refused with 503 (MirrorUnavailable) until it moves again.

Only a registration past the finality depth is served: adapter ids are sequential, so a reorg that
drops a registration gives its id to the next one, and the fees of receipts signed for the first
adapter would be split by the newcomer's owner share and lineage.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from node.db import queries
from node.db.models import Adapter
from node.errors import AdapterNotFound, MirrorUnavailable
from node.lora.provider import AdapterProvider, AdapterSource, LoadState


@dataclass(frozen=True)
class ServedAdapter:
    adapter_id: int
    model: str  # the name clients use
    registry_block: int  # the mirror head when it was resolved: the lineage as indexed there
    lineage: queries.AdapterLineageView


class AdapterCatalog:
    def __init__(self, factory: sessionmaker[Session], provider: AdapterProvider[object], base_model_id: str,
                 cache_ttl_s: float = 2.0, max_mirror_lag_s: float | None = None) -> None:
        self.factory = factory
        self.provider = provider
        self.base_model_id = base_model_id.lower()
        self.cache_ttl_s = cache_ttl_s
        self.max_mirror_lag_s = max_mirror_lag_s
        self._mirror_updated_at: datetime | None = None  # as of the last lookup (at most cache_ttl_s old)
        self._registered: set[int] = set()
        self._cache: dict[int, tuple[float, ServedAdapter]] = {}
        self._lock = threading.Lock()

    def resolve(self, model: str) -> ServedAdapter:
        """The adapter as the mirror has it (cached for `cache_ttl_s`: lineage is immutable, and a
        deprecation or the registry block may lag by that much)."""
        adapter_id = self._parse(model)
        now = time.monotonic()
        hit = self._cache.get(adapter_id)
        if hit is None or now - hit[0] >= self.cache_ttl_s:
            hit = self._cache[adapter_id] = (now, self._lookup(adapter_id, model))
        self._check_fresh()
        return hit[1]

    def _check_fresh(self) -> None:
        updated_at = self._mirror_updated_at
        if self.max_mirror_lag_s is None or updated_at is None:
            return
        lag_s = (datetime.now(UTC) - updated_at).total_seconds()
        if lag_s > self.max_mirror_lag_s:
            raise MirrorUnavailable("the chain mirror is stale: escrow and lineage may be out of date",
                                    mirror_lag_s=round(lag_s, 1), max_mirror_lag_s=self.max_mirror_lag_s)

    def cached(self, model: str) -> ServedAdapter | None:
        """`resolve` without touching the database: the cached adapter, or None (then call `resolve`,
        off the event loop)."""
        hit = self._cache.get(self._parse(model))
        if hit is None or time.monotonic() - hit[0] >= self.cache_ttl_s:
            return None
        self._check_fresh()  # a cache hit is no way around a stale mirror
        return hit[1]

    def _lookup(self, adapter_id: int, model: str) -> ServedAdapter:
        with self.factory() as session:
            head = queries.mirror_head(session)
            if head is None:
                raise MirrorUnavailable("the chain mirror has not indexed anything yet")
            self._mirror_updated_at = head.updated_at
            view = queries.adapter_lineage(session, adapter_id, at_block=head.last_block)
        if view is None:
            raise AdapterNotFound(f"adapter {model} is not registered", model=model)
        if view.base_model.lower() != self.base_model_id:
            raise AdapterNotFound(f"adapter {model} is for another base model", model=model,
                                  adapter_base_model=view.base_model, node_base_model=self.base_model_id)
        if view.is_deprecated:
            raise AdapterNotFound(f"adapter {model} is deprecated by its owner", model=model)
        if view.registered_block > head.final_block:
            raise AdapterNotFound(f"adapter {model} is registered but not final yet: it is served once block "
                                  f"{view.registered_block} is final", model=model,
                                  registered_block=view.registered_block, final_block=head.final_block)
        self._ensure_registered(view)
        return ServedAdapter(adapter_id, str(adapter_id), head.last_block, view)

    def _ensure_registered(self, view: queries.AdapterLineageView) -> None:
        with self._lock:
            if view.adapter_id in self._registered and \
                    self.provider.state(str(view.adapter_id)) is not LoadState.UNKNOWN:
                return
            self.provider.register(str(view.adapter_id), AdapterSource(uri=view.uri, sha256=view.weights_sha256))
            self._registered.add(view.adapter_id)

    def served(self) -> list[queries.AdapterLineageView]:
        """Every adapter registered (final) for this base model and not deprecated, per the mirror."""
        with self.factory() as session:
            head = queries.mirror_head(session)
            if head is None:
                return []
            ids = session.scalars(select(Adapter.adapter_id).where(Adapter.base_model == self.base_model_id,
                                                                   Adapter.deprecated_block.is_(None),
                                                                   Adapter.block_number <= head.final_block)
                                  .order_by(Adapter.adapter_id)).all()
            views = [queries.adapter_lineage(session, i) for i in ids]
        return [v for v in views if v is not None]

    @staticmethod
    def _parse(model: str) -> int:
        text = model.removeprefix("adapter-")
        if not text.isdigit() or len(text) > 30 or int(text) == 0:
            raise AdapterNotFound(f"unknown model {model!r}: use an adapter id from GET /v1/models", model=model)
        return int(text)
