"""Continuous batching: waiting and running queues, a token budget and a sequence cap per step.

Each step first gives every running sequence its pending tokens (one for a decode, a chunk for a
prefill not yet done), preempting the most recent running sequences (recompute: their blocks are
freed and they re-enter the waiting queue at the front) when the cache runs out of blocks. Then it
admits waiting sequences, FCFS (with the prefix cache: the oldest first, then those whose prompt starts
on cached blocks, then the rest; see `_admission_order`), skipping (never blocking on) those whose
adapter is not loaded yet or would exceed the distinct-adapter cap of the device slots, and only once the
free blocks hold its whole remaining prefill (admitted on its first chunk's alone, it was preempted at the
next while an older sequence grew, admitted again, and its prompt computed over and over). An admitted
sequence starts on the cached blocks of its prefix (the block manager's prefix cache); one whose next
block a running sequence is computing (the n choices of one prompt, or two requests with one system
prompt) waits a step and takes that block from the cache instead. Last, it looks ahead in the waiting
queue (the next `max_num_seqs` requests, also those not admitted because the batch is full or a preemption
happened) and starts background loads of their adapters, so that they are in host memory when their
turn comes; `SchedulerOutput.upcoming` names those adapters, in queue order, for the engine to copy
into free device slots.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from dataclasses import dataclass

from node.engine.block_manager import BlockManager
from node.engine.sequence import Sequence, SequenceStatus
from node.errors import NodeError
from node.lora.loads import AdapterLoads

log = logging.getLogger(__name__)
LOAD_WAIT_S = 0.01  # the longest an idle step waits on adapter loads (bounds the delay of new requests)


@dataclass(frozen=True)
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int

    @property
    def is_sampled(self) -> bool:
        """Whether this step reaches the sequence's last token, so a next token is sampled."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclass(frozen=True)
class SchedulerOutput:
    scheduled: tuple[ScheduledSeq, ...]
    failed: tuple[Sequence, ...]  # finished with "error" this step (their adapter failed to load)
    upcoming: tuple[str, ...] = ()  # adapters of the requests still waiting, first in line first

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, block_manager: BlockManager, adapters: AdapterLoads, *, max_num_seqs: int,
                 max_num_batched_tokens: int, max_adapter_slots: int):
        """`adapters`: what the scheduler asks of adapter residency (the engine's `LoRAManager.loads`)."""
        self.blocks, self.adapters = block_manager, adapters
        self.max_num_seqs, self.max_tokens = max_num_seqs, max_num_batched_tokens
        self.max_adapters = max_adapter_slots
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._num_preempted = 0

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def abort(self, request_id: str) -> Sequence | None:
        for queue in (self.running, self.waiting):
            for seq in queue:
                if seq.request_id == request_id:
                    queue.remove(seq)
                    self.blocks.release(seq)
                    seq.finish("abort")
                    return seq
        return None

    def fail(self, seq: Sequence, error: NodeError) -> None:
        """A running sequence that cannot go on (its adapter vanished from every tier, say)."""
        self.finish(seq)
        seq.finish("error", error)

    def finish(self, seq: Sequence) -> None:
        """Called by the engine once a running sequence hit a stop condition."""
        self.running.remove(seq)
        self.blocks.release(seq)

    def schedule(self) -> SchedulerOutput:
        for seq in self.running:  # the blocks the last step filled join the prefix cache
            self.blocks.commit(seq)
        budget = self.max_tokens
        scheduled: list[ScheduledSeq] = []
        num_preempted = self._num_preempted
        for seq in list(self.running):
            if seq not in self.running or budget == 0:
                continue  # preempted earlier in this loop, or no budget left this step
            n = min(seq.num_pending, budget)
            while not self.blocks.can_grow(seq, n) and self.running[-1] is not seq:
                self._preempt(self.running[-1])
            if not self.blocks.can_grow(seq, n):
                self._preempt(seq)
                continue
            self.blocks.grow(seq, n)
            scheduled.append(ScheduledSeq(seq, n))
            budget -= n
        # after a preemption, admitting would only take the blocks back and thrash (vLLM does the same)
        failed = self._admit(scheduled, budget) if num_preempted == self._num_preempted else []
        upcoming = self._look_ahead()
        if not scheduled and not failed:
            self._await_load()
        return SchedulerOutput(scheduled=tuple(scheduled), failed=tuple(failed), upcoming=upcoming)

    def _look_ahead(self) -> tuple[str, ...]:
        """Start loading the adapters of the next `max_num_seqs` waiting requests (at most
        `max_adapter_slots` distinct ones, so that a long queue of cold adapters cannot flush host
        memory); returns them in queue order. Never blocks: a prefetch only queues a load."""
        upcoming: dict[str, None] = {}
        for seq in itertools.islice(self.waiting, self.max_num_seqs):
            if seq.adapter_id is None or seq.adapter_id in upcoming:
                continue
            if len(upcoming) >= self.max_adapters:
                break
            upcoming[seq.adapter_id] = None
            self.adapters.start(seq.adapter_id)
        return tuple(upcoming)

    def _await_load(self) -> None:
        """Nothing can run until an adapter load ends: wait for one briefly rather than spin the step
        loop (a spinning loop takes the CPU and the GIL from the very loads it waits for)."""
        self.adapters.wait_any(LOAD_WAIT_S)

    def _admit(self, scheduled: list[ScheduledSeq], budget: int) -> list[Sequence]:
        failed: list[Sequence] = []
        if budget == 0 or len(self.running) >= self.max_num_seqs:
            return failed  # nothing can be admitted: ordering the queue (prefix lookups) would be wasted
        active = {s.adapter_id for s in self.running if s.adapter_id is not None}
        computing = self._computing() if self.waiting and self.blocks.enable_caching else set()
        for seq in self._admission_order():
            if budget == 0 or len(self.running) >= self.max_num_seqs:
                break
            error = self._adapter_error(seq)
            if error is not None:
                self.waiting.remove(seq)
                seq.finish("error", error)
                failed.append(seq)
                continue
            if not self._adapter_ready(seq):
                continue  # loading in the background; later requests may go first
            is_new_adapter = seq.adapter_id is not None and seq.adapter_id not in active
            if is_new_adapter and len(active) >= self.max_adapters:
                continue  # every slot is taken by running sequences of other adapters
            num_hit = self.blocks.acquire_prefix(seq)
            next_block = self.blocks.next_block_hash(seq)
            if next_block is not None and next_block in computing:
                self.blocks.release(seq)
                continue  # a running sequence computes its next block (n choices, say): hit it next step
            n = min(seq.num_pending, budget)
            if not self.blocks.can_grow(seq, seq.num_pending):  # its whole prefill, not this step's chunk alone
                self.blocks.release(seq)  # the cached blocks it took
                break  # FCFS on memory: do not let later, smaller requests starve this one
            self.waiting.remove(seq)
            self.blocks.grow(seq, n)
            self.blocks.count_lookup(seq.num_tokens, num_hit)
            computing.update(self.blocks.pending_hashes(seq))
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            if seq.adapter_id is not None:
                active.add(seq.adapter_id)
            scheduled.append(ScheduledSeq(seq, n))
            budget -= n
        return failed

    def _admission_order(self) -> list[Sequence]:
        """The waiting requests in the order `_admit` takes them: FCFS without the prefix cache. With it,
        the oldest first (no request waits more steps than there are requests ahead of it), then those of
        the next `max_num_seqs` whose prompt starts on cached blocks, longest cached prefix first (SGLang's
        longest-prefix-match), then the rest in order. A hit costs only its uncached suffix, so admitting
        hits first turns a step's token budget into more first tokens (chat traffic: one system prompt
        computed, then every request behind it a short user turn)."""
        waiting = list(self.waiting)
        if not self.blocks.enable_caching or len(waiting) < 3:
            return waiting
        head, window, rest = waiting[0], waiting[1:1 + self.max_num_seqs], waiting[1 + self.max_num_seqs:]
        num_cached = {id(seq): self.blocks.num_cached_blocks(seq) for seq in window}
        window.sort(key=lambda seq: -num_cached[id(seq)])  # stable: in order among equals
        return [head, *window, *rest]

    def _computing(self) -> set[bytes]:
        """Hashes of the full blocks running sequences have yet to compute: a waiting sequence whose
        next block is among them waits for it rather than compute it again."""
        return {h for seq in self.running for h in self.blocks.pending_hashes(seq)}

    def _adapter_ready(self, seq: Sequence) -> bool:
        return seq.adapter_id is None or self.adapters.is_ready(seq.adapter_id)

    def _adapter_error(self, seq: Sequence) -> NodeError | None:
        return None if seq.adapter_id is None else self.adapters.error(seq.adapter_id)

    def defer(self, seq: Sequence) -> None:
        """Send a sequence admitted this step back to the front of the queue, its blocks released:
        its adapter found no device slot (every slot its rank fits holds an adapter of a running
        sequence). It is admitted again once one of them finishes. Not counted as a preemption."""
        self.running.remove(seq)
        self.blocks.count_lookup(-seq.num_tokens, -seq.num_computed_tokens)  # counted when it runs
        self.blocks.release(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def _preempt(self, seq: Sequence) -> None:
        log.debug("preempting %s (recompute)", seq.request_id)
        self.running.remove(seq)
        self.blocks.release(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self._num_preempted += 1
        self.waiting.appendleft(seq)
