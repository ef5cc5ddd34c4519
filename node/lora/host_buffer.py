"""HostBufferPool: the host memory that adapter loads read their tensors into, reused from load to load.

A load from the trusted disk cache reads an adapter's tensors with one `preadv` into a new buffer of
its gather plan's size (`AdapterFiles.gather`). Taken fresh from the allocator, that buffer can be
memory the kernel has to fault in and zero page by page (224 faults and 0.2 ms for 1 MiB, depending on
what the allocator gave back before), and the preadv's iovecs (one memoryview per tensor) are sliced
again on every load. The pool keeps the blocks of loads whose adapters are gone (resident, already
faulted in) and hands them out again, with the iovecs sliced for the last plan read into each.

A buffer is handed out as a tensor over a memoryview of its block; every view of that tensor keeps the
memoryview alive, so the memoryview dies exactly when the last tensor over the buffer does (the host
cache evicted the adapter and nothing else holds its stacks). A weak reference to it then puts the
block back, unless `max_free_bytes` of free blocks are kept already (a block is never handed out twice
while in use: only a dead memoryview returns it). A release can run on any thread, or on the thread
of a `take` in the middle of it (a garbage collection): the lock is reentrant.
Pinned buffers (CUDA) are not pooled: torch's pinned allocator caches its blocks itself.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence

import torch

Pieces = Sequence[tuple[int, int]]  # (begin, end) ranges of a buffer
MAX_FREE_BYTES = 64 << 20  # free blocks kept for the next loads (64 adapters of 1 MiB; a larger block is not kept)


class _Block:
    """One reusable buffer, and the iovecs last sliced from it (for `plan`)."""

    __slots__ = ("iovecs", "memory", "plan")

    def __init__(self, nbytes: int) -> None:
        self.memory = bytearray(nbytes)
        self.plan: object = None
        self.iovecs: list[list[memoryview]] = []


class HostBufferPool:
    def __init__(self, max_free_bytes: int = MAX_FREE_BYTES) -> None:
        self.max_free_bytes = max_free_bytes
        self._free: dict[int, list[_Block]] = {}  # nbytes -> blocks no tensor views
        # blocks handed out, by the id of the weak reference to their memoryview (which the dict keeps alive)
        self._lent: dict[int, tuple[weakref.ref[memoryview], _Block]] = {}
        self._num_free_bytes = 0
        self._lock = threading.RLock()

    @property
    def num_free_bytes(self) -> int:
        return self._num_free_bytes

    def take(self, nbytes: int, plan: object, runs: Sequence[Pieces]) -> tuple[torch.Tensor, list[list[memoryview]]]:
        """A uint8 tensor [nbytes] over a free block (a new one if none is), and for each run of `runs`
        the memoryviews of its pieces of that buffer, for `preadv` (sliced once per block and plan:
        `plan` is the object that `runs` belongs to, compared by identity)."""
        with self._lock:
            free = self._free.get(nbytes)
            block = free.pop() if free else None
            if block is not None:
                self._num_free_bytes -= nbytes
        if block is None:
            block = _Block(nbytes)
        if block.plan is not plan:
            whole = memoryview(block.memory)
            block.iovecs = [[whole[begin:end] for begin, end in pieces] for pieces in runs]
            block.plan = plan
        handed = memoryview(block.memory)
        ref = weakref.ref(handed, self._release)
        with self._lock:
            self._lent[id(ref)] = (ref, block)
        return torch.frombuffer(handed, dtype=torch.uint8), block.iovecs

    def _release(self, ref: weakref.ref[memoryview]) -> None:
        """The last tensor over a block is gone: keep the block for the next load, within the budget."""
        with self._lock:
            _, block = self._lent.pop(id(ref))
            nbytes = len(block.memory)
            if self._num_free_bytes + nbytes <= self.max_free_bytes:
                self._num_free_bytes += nbytes
                self._free.setdefault(nbytes, []).append(block)
