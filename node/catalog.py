"""Which adapters this node serves: the registry mirror, filtered to this node's base model.

`model` in an OpenAI request is the adapter's registry id (a decimal string), or the base model's served
name (`base_model_name`: the model alone, adapter id 0 in its receipts). The catalog reads the
mirror (never the chain), refuses adapters for another base model or deprecated ones, and hands the
engine's adapter provider plain values: the URI and the registered sha256. Every paid request goes
through `resolve`, so it is also where a mirror that cannot be trusted stops paid work, with its reason
in the 503 (MirrorUnavailable): one written from another chain (`binding_fault`, checked when the API
starts, or the indexer's halt), one whose indexer cannot follow the chain, has not reached it for
`max_mirror_lag_s`, or is more than `max_mirror_lag_blocks` behind (`MirrorHead.problem`). The cursor
is read again once it is `MIRROR_TTL_S` old, so the indexer's verdict reaches requests within that.

Only a registration past the finality depth is served: adapter ids are sequential, so a reorg that
drops a registration gives its id to the next one, and the fees of receipts signed for the first
adapter would be split by the newcomer's owner share and lineage.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy.orm import Session, sessionmaker

from node.db import queries
from node.errors import AdapterNotFound, MirrorUnavailable
from node.lora.provider import AdapterRegistrar, AdapterSource, LoadState
from node.protocol.receipt import BASE_ADAPTER_ID

MIRROR_TTL_S = 0.25  # how stale the indexer's verdict on the mirror may be when a request is admitted


@dataclass(frozen=True)
class ServedAdapter:
    adapter_id: int
    model: str  # the name clients use
    registry_block: int  # the mirror head when it was resolved: the lineage as indexed there
    lineage: queries.AdapterLineageView | None  # None: the base model alone (no owner, no datasets)

    @property
    def is_base(self) -> bool:
        return self.adapter_id == BASE_ADAPTER_ID

    @property
    def engine_adapter(self) -> str | None:
        """The id the engine knows the adapter by; None for the base model alone."""
        return None if self.is_base else str(self.adapter_id)


@dataclass(frozen=True)
class AdapterStatus:
    adapter_id: int
    state: str  # serving | not_final | deprecated | cannot_load
    detail: str


class AdapterCatalog:
    def __init__(self, factory: sessionmaker[Session], provider: AdapterRegistrar, base_model_id: str,
                 base_model_name: str | None = None, cache_ttl_s: float = 2.0, max_mirror_lag_s: float | None = None,
                 max_mirror_lag_blocks: int = 32) -> None:
        self.factory = factory
        self.provider = provider
        self.base_model_id = base_model_id.lower()
        self.base_model_name = base_model_name  # None: the base model alone is not served by name
        self.started_at = int(time.time())  # when this catalog began serving the base model (unix seconds)
        if base_model_name is not None and _adapter_number(base_model_name) is not None:
            raise ValueError(f"the base model's name {base_model_name!r} reads as an adapter id")
        self.cache_ttl_s = cache_ttl_s
        self.max_mirror_lag_s = max_mirror_lag_s
        self.max_mirror_lag_blocks = max_mirror_lag_blocks
        self.binding_fault: str | None = None  # the API's chain is not the mirror's (checked at start)
        self.mirror_ttl_s = min(cache_ttl_s, MIRROR_TTL_S)
        self._mirror: queries.MirrorHead | None = None  # the cursor as last read
        self._mirror_read_at = -math.inf  # time.monotonic() of that read
        self._registered: set[int] = set()
        self._cache: dict[int, tuple[float, ServedAdapter]] = {}
        self._lock = threading.Lock()
        self._listed: tuple[float, queries.MirrorHead | None, list[queries.AdapterLineageView]] | None = None
        self._listing_lock = threading.Lock()  # one listing read at a time: the others wait for it

    def resolve(self, model: str) -> ServedAdapter:
        """The adapter as the mirror has it (cached for `cache_ttl_s`: lineage is immutable, and a
        deprecation or the registry block may lag by that much)."""
        adapter_id = self._parse(model)
        now = time.monotonic()
        hit = self._cache.get(adapter_id)
        if hit is None or now - hit[0] >= self.cache_ttl_s:
            found = self._base() if adapter_id == BASE_ADAPTER_ID else self._lookup(adapter_id, model)
            hit = self._cache[adapter_id] = (now, found)
        elif now - self._mirror_read_at >= self.mirror_ttl_s:
            with self.factory() as session:
                self._read_mirror(session)
        self._check_fresh()
        return hit[1]

    def _read_mirror(self, session: Session) -> queries.MirrorHead | None:
        self._mirror_read_at = time.monotonic()
        self._mirror = queries.mirror_head(session)
        return self._mirror

    def mirror_problem(self, head: queries.MirrorHead | None) -> str | None:
        """Why paid work must not rely on the mirror `head` (None: it may)."""
        if self.binding_fault:
            return self.binding_fault
        if head is None:
            return "the chain mirror has not indexed anything yet"
        if self.max_mirror_lag_s is None:
            return head.halted_reason
        return head.problem(datetime.now(UTC), self.max_mirror_lag_s, self.max_mirror_lag_blocks)

    def _check_fresh(self) -> None:
        """Refuse (503) while the mirror as of the last lookup cannot be trusted."""
        problem = self.mirror_problem(self._mirror)
        if problem:
            raise MirrorUnavailable(f"the chain mirror cannot be trusted for paid work: {problem}")

    def cached(self, model: str) -> ServedAdapter | None:
        """`resolve` without touching the database: the cached adapter, or None (then call `resolve`,
        off the event loop)."""
        hit, now = self._cache.get(self._parse(model)), time.monotonic()
        if hit is None or now - hit[0] >= self.cache_ttl_s or now - self._mirror_read_at >= self.mirror_ttl_s:
            return None
        self._check_fresh()  # a cache hit is no way around a stale mirror
        return hit[1]

    async def resolve_async(self, model: str) -> ServedAdapter:
        """`cached`, else `resolve` off the event loop (what a request handler calls)."""
        hit = self.cached(model)
        return hit if hit is not None else await asyncio.to_thread(self.resolve, model)

    def _lookup(self, adapter_id: int, model: str) -> ServedAdapter:
        with self.factory() as session:
            head = self._read_mirror(session)
            self._check_fresh()
            assert head is not None, "a mirror that has indexed nothing is refused"
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

    def _base(self) -> ServedAdapter:
        """The base model alone: nothing to look up, but paid work needs a mirror it can trust (the
        escrow and lanes come from it) and the receipt names the mirror's block."""
        with self.factory() as session:
            head = self._read_mirror(session)
        self._check_fresh()
        assert head is not None and self.base_model_name is not None
        return ServedAdapter(BASE_ADAPTER_ID, self.base_model_name, head.last_block, None)

    def _ensure_registered(self, view: queries.AdapterLineageView) -> None:
        with self._lock:
            if view.adapter_id in self._registered and \
                    self.provider.state(str(view.adapter_id)) is not LoadState.UNKNOWN:
                return
            self.provider.register(str(view.adapter_id), AdapterSource(uri=view.uri, sha256=view.weights_sha256))
            self._registered.add(view.adapter_id)

    def served(self, adapter_id: int | None = None) -> list[queries.AdapterLineageView]:
        """Every adapter registered (final) for this base model and not deprecated, per the mirror, less
        those whose last load here failed (a file that does not match its registered hash, say); only
        `adapter_id` when given."""
        head, views = self._listing()
        if head is None:
            return []
        return [v for v in views if not v.is_deprecated and v.registered_block <= head.final_block
                and adapter_id in (None, v.adapter_id)
                and self.provider.state(str(v.adapter_id)) is not LoadState.FAILED]

    def statuses(self) -> list[AdapterStatus]:
        """Every adapter registered for this base model, with what a request for it meets now: served,
        not final yet, deprecated, or refused by its last load (a sha256 mismatch, a URI that does not
        answer); one never requested is not fetched yet, so whether it loads is not known."""
        head, views = self._listing()
        final_block = head.final_block if head is not None else -1
        return [self._status(v, final_block) for v in views]

    def _listing(self) -> tuple[queries.MirrorHead | None, list[queries.AdapterLineageView]]:
        """The mirror's head and every adapter registered for this base model. GET /v1/models and
        /v1/adapters are free to anyone, and each call read every adapter, two queries each: a few dozen
        in flight held every pooled connection. Now one caller at a time reads, the cursor at most every
        `mirror_ttl_s`, and the adapters (two queries) only once the indexer has moved the mirror."""
        with self._listing_lock:
            now, listed = time.monotonic(), self._listed
            if listed is not None and now - listed[0] < self.mirror_ttl_s:
                return listed[1], listed[2]
            with self.factory() as session:
                head = self._read_mirror(session)
                if listed is None or _moved(listed[1], head):
                    views = queries.adapter_lineages(session, self.base_model_id)
                else:
                    views = listed[2]
            self._listed = (now, head, views)
            return head, views

    def _status(self, view: queries.AdapterLineageView, final_block: int) -> AdapterStatus:
        if view.is_deprecated:
            return AdapterStatus(view.adapter_id, "deprecated", "deprecated by its owner")
        if view.registered_block > final_block:
            return AdapterStatus(view.adapter_id, "not_final", f"served once block {view.registered_block} is "
                                 f"final (final block now {final_block})")
        name = str(view.adapter_id)
        state = self.provider.state(name)
        if state is LoadState.FAILED:
            error = self.provider.error(name)
            reason = getattr(error, "message", None) or str(error) or type(error).__name__
            return AdapterStatus(view.adapter_id, "cannot_load", f"cannot load: {reason}")
        detail = {LoadState.READY: "in host memory", LoadState.LOADING: "loading",
                  LoadState.COLD: "not in host memory: loads on its next request"}.get(
            state, "not fetched yet: fetched and checked against its sha256 on its first request")
        return AdapterStatus(view.adapter_id, "serving", detail)

    def describe(self, model: str) -> queries.AdapterLineageView | None:
        """The servable adapter `model` names (None: the base model alone); AdapterNotFound otherwise."""
        adapter_id = self._parse(model)
        if adapter_id == BASE_ADAPTER_ID:
            return None
        found = self.served(adapter_id)
        if not found:
            raise AdapterNotFound(f"model {model!r} is not served here: list them with GET /v1/models", model=model)
        return found[0]

    def _parse(self, model: str) -> int:
        """The adapter id `model` names; BASE_ADAPTER_ID for the base model's name."""
        if self.base_model_name is not None and model == self.base_model_name:
            return BASE_ADAPTER_ID
        number = _adapter_number(model)
        if number is None:
            raise AdapterNotFound(f"unknown model {model!r}: use a model id from GET /v1/models", model=model)
        return number


def _moved(before: queries.MirrorHead | None, now: queries.MirrorHead | None) -> bool:
    """The indexer wrote the mirror since `before` (the registry rows may differ)."""
    if before is None or now is None:
        return True
    return (before.last_block, before.final_block, before.updated_at) != (now.last_block, now.final_block,
                                                                           now.updated_at)


def _adapter_number(model: str) -> int | None:
    """The registry id in `model` ("7" or "adapter-7"), or None when it names no adapter. ASCII digits only:
    str.isdigit also takes "²" (which int() refuses) and other scripts' digits (another name for the id)."""
    text = model.removeprefix("adapter-")
    if not (text.isascii() and text.isdigit()) or len(text) > 30 or int(text) == 0:
        return None
    return int(text)
