"""The chain indexer: follows the registries, the escrow and the settlement contract into the mirror.

Each step reads one block range `[cursor + 1, to]` (at most `head - confirmations`):
- headers: the first block's (its parent must be the cursor's hash), the last one's, and every
  block above the finalized one (their hashes are stored to find a fork point later);
- logs by address and topics, in a range that grows on success and shrinks on provider errors, asked
  with the range's last header in one request (a lagging node's empty answer is not 'no events');
- one database transaction: raw events, derived rows, block hashes, the cursor, finality marks.
A hash mismatch rolls back every derived row above the fork point in one transaction, then the
next step re-scans; a fork at or below the finalized block halts with ReorgTooDeep.

The mirror is bound to one chain (node/chain/binding.py): the first step stores the chain's genesis
hash with the cursor, every later one reads block 0 with the cursor's block and compares. Another
chain (ChainMismatch) or a deep reorg halts the indexer for good and writes the reason on the cursor,
where the API reads it and refuses paid work at once; a step that fails (RPC unreachable, behind)
writes its reason too, cleared by the next good step, and every good step writes the head it saw.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from node.chain.binding import ChainBinding, IndexedContracts, mismatch_message
from node.chain.cursor import Cursors
from node.chain.events import BY_NAME, SPECS, decode_log
from node.chain.mirror import Mirror
from node.chain.rpc import BlockHeader, Rpc
from node.db.base import table_of
from node.db.models import ChainBlock, IndexerCursor
from node.db.types import utc_now
from node.db.upsert import upsert
from node.errors import (
    ChainMismatch,
    ChainMoved,
    ConfigError,
    MirrorHalted,
    RangeTooLarge,
    ReorgTooDeep,
    RpcBehind,
    RpcTransient,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class IndexerConfig:
    chain_id: int
    confirmations: int = 2
    finality_depth: int = 64
    start_block: int = 0
    initial_range: int = 1_000
    min_range: int = 1
    max_range: int = 10_000
    target_logs: int = 10_000  # per range; a denser range shrinks the next one
    poll_interval_s: float = 1.0
    max_attempts: int = 8  # per RPC read, before the step gives up (run_forever then retries)
    backoff_s: float = 0.1
    max_backoff_s: float = 5.0

    def __post_init__(self) -> None:
        if not 0 <= self.confirmations < self.finality_depth:
            raise ConfigError("need 0 <= confirmations < finality_depth",
                              confirmations=self.confirmations, finality_depth=self.finality_depth)
        if not 1 <= self.min_range <= self.initial_range <= self.max_range:
            raise ConfigError("need 1 <= min_range <= initial_range <= max_range")


@dataclass(frozen=True)
class Progress:
    head: int
    last_block: int
    final_block: int
    from_block: int | None = None
    to_block: int | None = None
    num_events: int = 0
    rolled_back_to: int | None = None
    num_rolled_back: int = 0
    rpc_s: float = 0.0
    db_s: float = 0.0

    @property
    def is_caught_up(self) -> bool:
        return self.to_block is None and self.rolled_back_to is None


@dataclass
class _Timer:
    rpc_s: float = 0.0
    db_s: float = 0.0
    marks: dict[str, float] = field(default_factory=dict)


class Indexer:
    """`Indexer(config, rpc, session_factory, contracts)`; `rpc` is an `Rpc`, a URL, or a Web3."""

    def __init__(self, config: IndexerConfig, rpc: Rpc | str | Any, session_factory: sessionmaker[Session],
                 contracts: IndexedContracts, sleep: Callable[[float], None] = time.sleep) -> None:
        self.config = config
        if not isinstance(rpc, Rpc):
            rpc = Rpc(rpc if isinstance(rpc, str) else rpc.provider.endpoint_uri)
        self.rpc = rpc
        self.sessions = session_factory
        self.contracts = contracts
        self.cursors = Cursors(session_factory, config.chain_id, config.start_block, contracts)
        self.mirror = Mirror(config.chain_id, config.finality_depth)
        self.range = config.initial_range
        self.range_cap = config.max_range  # lowered to what the provider says it accepts
        self._roles = contracts.roles()
        self._topics = sorted({s.topic0 for s in SPECS})
        self._sleep = sleep
        self._bound: ChainBinding | None = None  # checked against the chain by this process

    @classmethod
    def for_deployment(cls, deployment: Any, rpc: Rpc | str | Any, session_factory: sessionmaker[Session], *,
                       confirmations: int = 2, finality_depth: int = 64) -> Indexer:
        """The indexer of a `node.chain.deploy.Deployment`, starting at its first block (what
        `loranode indexer` runs, after `node.db.session.upgrade(url)`)."""
        cfg = IndexerConfig(chain_id=deployment.chain_id, confirmations=confirmations,
                            finality_depth=finality_depth, start_block=deployment.from_block)
        return cls(cfg, rpc, session_factory, IndexedContracts.from_deployment(deployment))

    # --- one step -------------------------------------------------------------------------------

    def run_once(self) -> Progress:
        """Index the next range (or roll back a reorg). Transient RPC errors are retried here up to
        `max_attempts` each, then raised (RpcTransient) for the caller to retry later."""
        t = _Timer()
        bound = self._bound or self.bind()
        # the head is the liveness probe: the API stops paid work at its first failure, not after the retries
        head = self._timed(t, "rpc", lambda: self._retry(self.rpc.block_number, self.cursors.note_stall))
        with self.sessions() as session:
            cursor = self.cursors.get(session)
            if cursor.halted_reason:
                raise MirrorHalted(f"the mirror is halted: {cursor.halted_reason}")
            last, last_hash, final_mark = cursor.last_block, cursor.last_block_hash, cursor.final_block
        final = max(final_mark, head - self.config.finality_depth)
        wanted = [0, last] if last_hash is not None else [0]
        tips = self._timed(t, "rpc", lambda: self._retry(lambda: self.rpc.headers(wanted)))
        if tips[0] is None or tips[0].hash != bound.genesis_hash:  # the chain was replaced under us
            diff = {"genesis_hash": {"stored": bound.genesis_hash, "live": tips[0] and tips[0].hash}}
            self.cursors.halt(ChainMismatch(mismatch_message(diff), differences=diff))
        if last_hash is not None:
            if tips[1] is None:
                raise RpcBehind("the RPC lacks the mirror's last block", last_block=last, rpc_head=head)
            if tips[1].hash != last_hash:
                return self._reorg(t, head, last)
        target = head - self.config.confirmations
        if target <= last:
            return self._finalize_only(t, head, last, min(final, last))
        to = min(target, last + self.range)
        try:
            headers, events = self._read(t, last + 1, to, final, last_hash)
            to = headers[-1].number  # the log range may have shrunk
        except ChainMoved as e:
            log.warning("chain moved while reading blocks %d..%d: %s", last + 1, to, e.facts)
            return self._reorg(t, head, last)
        num = self._timed(t, "db", lambda: self._write(headers, events, last, to, min(final, to), head))
        return Progress(head, to, min(final, to), last + 1, to, num, rpc_s=t.rpc_s, db_s=t.db_s)

    def run_forever(self, stop: threading.Event) -> None:
        """Follow the chain until `stop` is set. Transient RPC and database errors are logged, noted
        on the cursor (the API is not ready meanwhile) and retried; another chain, a deep reorg and
        any other error stop the process (fail closed)."""
        delay = self.config.backoff_s
        while not stop.is_set():
            try:
                progress = self.run_once()
            except (RpcTransient, OperationalError) as e:
                log.warning("indexer step failed, retrying in %.1fs: %s", delay, e)
                self.cursors.note_stall(e)
                stop.wait(delay)
                delay = min(delay * 2, self.config.max_backoff_s)
                continue
            delay = self.config.backoff_s
            if progress.is_caught_up:
                stop.wait(self.config.poll_interval_s)

    # --- the chain this mirror is bound to --------------------------------------------------------

    def bind(self) -> ChainBinding:
        """Hold the RPC's chain against the one the mirror was written from, storing it on the first
        write. Another chain halts the mirror (ChainMismatch, its reason on the cursor); a mirror halted
        only for another chain resumes once the RPC is its chain again."""
        try:
            live = self._retry(lambda: ChainBinding.read(self.rpc, self.contracts), self.cursors.note_stall)
        except ChainMismatch as e:  # an indexed contract has no code there
            self.cursors.halt(e)
        with self.sessions() as session:
            cursor = self.cursors.get(session)
            halted, stored = cursor.halted_reason, self._stored_binding(cursor, live)
        if halted and not halted.startswith(ChainMismatch.code):
            raise MirrorHalted(f"the mirror is halted: {halted}", fix="start on a fresh database")
        diff = stored.differences(live)
        if diff:
            self.cursors.halt(ChainMismatch(mismatch_message(diff), differences=diff))
        self.cursors.genesis_hash = live.genesis_hash  # a new cursor is written with it
        with self.sessions() as session, session.begin():
            cursor = self.cursors.get(session, lock=True)
            if cursor in session:  # the mirror exists: bind it (a new one is, at its first write)
                cursor.genesis_hash, cursor.halted_reason = live.genesis_hash, None
        self._bound = live
        return live

    def _stored_binding(self, cursor: IndexerCursor, live: ChainBinding) -> ChainBinding:
        """The cursor's binding; a mirror with none yet (new, or written before bindings were stored)
        takes the live chain's genesis only if that chain still has the mirror's last block."""
        genesis = cursor.genesis_hash
        if genesis is None:
            tip = None if cursor.last_block_hash is None else self._retry(
                lambda: self.rpc.headers([cursor.last_block])[0])
            kept = cursor.last_block_hash is None or (tip is not None and tip.hash == cursor.last_block_hash)
            genesis = live.genesis_hash if kept else "unknown: the chain lacks the mirror's last block"
        return ChainBinding(cursor.chain_id, genesis, cursor.contracts)

    # --- reading --------------------------------------------------------------------------------

    def _read(self, t: _Timer, start: int, to: int, final: int,
              parent_hash: str | None) -> tuple[list[BlockHeader], list[Any]]:
        """Headers and decoded events of `[start, to]`; `to` may shrink (the range adapts)."""
        logs, to = self._timed(t, "rpc", lambda: self._logs(start, to))
        wanted = sorted({start, to, *range(max(start, final + 1), to + 1)})
        headers = self._timed(t, "rpc", lambda: self._retry(lambda: self.rpc.headers(wanted)))
        known = {h.number: h for h in headers if h is not None}
        if len(known) != len(wanted):
            raise RpcBehind("a block disappeared while reading", start=start, to=to)
        if parent_hash is not None and known[start].parent_hash != parent_hash:
            raise ChainMoved("the next block does not extend the cursor", block=start)
        for n in wanted[1:]:
            if n - 1 in known and known[n].parent_hash != known[n - 1].hash:
                raise ChainMoved("headers do not chain", block=n)
        events = []
        for raw in logs:
            if raw.get("removed"):
                continue
            ev = decode_log(raw, self.config.chain_id)
            if ev is None or self._roles.get(ev.address) is not BY_NAME[ev.name].role:
                continue
            h = known.get(ev.block_number)
            if h is not None and h.hash != ev.block_hash:
                raise ChainMoved("a log's block is not the canonical one", block=ev.block_number)
            events.append(ev)
        events.sort(key=lambda e: e.position)
        return [known[n] for n in wanted], events

    def _logs(self, start: int, to: int) -> tuple[list[dict[str, Any]], int]:
        """`eth_getLogs` over `[start, to]`, shrinking the range on named transient errors."""
        addresses = sorted(self._roles)
        attempt = 0
        while True:
            to = min(to, start + self.range - 1)
            try:
                logs = self.rpc.logs(start, to, addresses, self._topics)
            except RpcBehind as e:  # the node that answered lags: asked again (another may answer), same range
                attempt += 1
                if attempt >= self.config.max_attempts:
                    raise
                log.info("getLogs %d..%d answered by a node behind (%s); asking again", start, to, e.code)
                self._sleep(min(self.config.backoff_s * 2 ** (attempt - 1), self.config.max_backoff_s))
                continue
            except RpcTransient as e:
                attempt += 1
                width = to - start + 1
                if isinstance(e, RangeTooLarge):
                    hint = e.facts.get("suggested_blocks")
                    self.range_cap = max(self.config.min_range, min(hint or width // 2, width - 1))
                self.range = max(self.config.min_range, min(self.range_cap, width // 2))
                log.info("getLogs %d..%d failed (%s); range now %d", start, to, e.code, self.range)
                if attempt >= self.config.max_attempts:
                    raise
                self._sleep(min(self.config.backoff_s * 2 ** (attempt - 1), self.config.max_backoff_s))
                continue
            self._adapt(len(logs))
            return logs, to

    def _adapt(self, num_logs: int) -> None:
        c = self.config
        if num_logs > c.target_logs:
            self.range = max(c.min_range, self.range * c.target_logs // num_logs)
        else:
            self.range = min(self.range_cap, self.range * 2)

    def _retry(self, read: Callable[[], T], on_failure: Callable[[Exception], None] | None = None) -> T:
        """`read()`, retried on RpcTransient; `on_failure` is told of the first failure at once."""
        for attempt in range(1, self.config.max_attempts + 1):
            try:
                return read()
            except RpcTransient as e:
                if attempt == 1 and on_failure is not None:
                    on_failure(e)
                if attempt == self.config.max_attempts:
                    raise
                log.info("RPC read failed (%s), attempt %d", e.code, attempt)
                self._sleep(min(self.config.backoff_s * 2 ** (attempt - 1), self.config.max_backoff_s))
        raise AssertionError("unreachable")

    # --- writing --------------------------------------------------------------------------------

    def _write(self, headers: Sequence[BlockHeader], events: Sequence[Any], last: int, to: int,
               final: int, head: int) -> int:
        with self.sessions() as session, session.begin():
            cursor = self.cursors.get(session, lock=True)
            if cursor.last_block != last:
                raise ChainMoved("another indexer moved the cursor", expected=last, found=cursor.last_block)
            num = self.mirror.ingest(session, events, final)
            upsert(session, table_of(ChainBlock), [
                {"chain_id": self.config.chain_id, "number": h.number, "hash": h.hash,
                 "parent_hash": h.parent_hash} for h in headers if h.number > final or h.number == to])
            cursor.last_block, cursor.last_block_hash = to, headers[-1].hash
            self._mark_final(session, cursor, final)
            self.cursors.mark_checked(cursor, head)
            session.add(cursor)
        return num

    def _mark_final(self, session: Session, cursor: IndexerCursor, final: int) -> None:
        if final > cursor.final_block:
            self.mirror.finalize(session, final)
            cursor.final_block = final
        cursor.updated_at = utc_now()

    def _finalize_only(self, t: _Timer, head: int, last: int, final: int) -> Progress:
        def write() -> None:
            with self.sessions() as session, session.begin():
                cursor = self.cursors.get(session, lock=True)
                if final > cursor.final_block:
                    self._mark_final(session, cursor, final)
                self.cursors.mark_checked(cursor, head)
                session.add(cursor)
        self._timed(t, "db", write)
        return Progress(head, last, final, rpc_s=t.rpc_s, db_s=t.db_s)

    def _reorg(self, t: _Timer, head: int, last: int) -> Progress:
        """Find the highest stored block the chain still has; roll everything above it back."""
        with self.sessions() as session:
            stored = list(session.scalars(select(ChainBlock).where(
                ChainBlock.chain_id == self.config.chain_id, ChainBlock.number <= last)
                .order_by(ChainBlock.number.desc())))
            final_mark = self.cursors.get(session).final_block
        numbers = [b.number for b in stored]
        canonical = self._timed(t, "rpc", lambda: self._retry(lambda: self.rpc.headers(numbers)))
        match = [b for b, h in zip(stored, canonical, strict=True) if h is not None and h.hash == b.hash]
        fork_block = match[0].number if match else self.config.start_block - 1
        fork_hash = match[0].hash if match else None
        if (match and fork_block < final_mark) or (not match and final_mark >= 0):
            self.cursors.halt(ReorgTooDeep("reorg reaches below the finalized block (or this is another chain); "
                                    "halting instead of rewriting it: start on a fresh database",
                                    last_block=last, final_block=final_mark,
                                    oldest_checked=numbers[-1] if numbers else None))

        def write() -> int:
            with self.sessions() as session, session.begin():
                cursor = self.cursors.get(session, lock=True)
                num = self.mirror.rollback(session, fork_block, cursor.final_block)
                cursor.last_block, cursor.last_block_hash = fork_block, fork_hash
                cursor.updated_at = utc_now()
                self.cursors.mark_checked(cursor, head)
                session.add(cursor)
                return num
        num = self._timed(t, "db", write)
        log.warning("reorg: rolled back from block %d to %d (%d events)", last, fork_block, num)
        return Progress(head, fork_block, final_mark, rolled_back_to=fork_block, num_rolled_back=num,
                        rpc_s=t.rpc_s, db_s=t.db_s)

    def _timed(self, t: _Timer, kind: str, fn: Callable[[], T]) -> T:
        start = time.perf_counter()
        try:
            return fn()
        finally:
            elapsed = time.perf_counter() - start
            if kind == "rpc":
                t.rpc_s += elapsed
            else:
                t.db_s += elapsed
