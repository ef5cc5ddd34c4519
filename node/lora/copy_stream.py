"""Host -> device copies of adapter weights on a side stream, ordered by one event per adapter load.

On CUDA, `LoRASlots` writes an adapter into its slot inside `writing(adapter, victim)`: the copies
(from pinned staging memory, non-blocking) and the slot's bookkeeping kernels run on a side stream,
overlapped with whatever step the main stream is running, and an event is recorded after them.
Two orders matter, and nothing else waits:
- a step reads an adapter only after its copy: `wait_for(the step's adapters)` makes the main stream
  wait on the events of those adapters whose copy is still pending, and only those; a step that does
  not use an adapter being copied does not wait for it;
- a slot is overwritten only after the steps that read it: `record_use(slots)` records, after each
  step, an event on the main stream for the (global) slots it read; the side stream waits on the
  slot's event before writing over it (a slot no step has read since its last write waits on nothing).
On the CPU the same code runs with no-op events: copies are synchronous, so every wait is already
satisfied, and the bookkeeping (which step would wait on which adapter) is what tests check.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch


class _NoEvent:
    """The CPU's event: work is done when it is issued."""

    def record(self, stream: object = None) -> None:
        return None

    def wait(self, stream: object = None) -> None:
        return None


class AdapterCopyStream:
    def __init__(self, device: torch.device):
        self.device = device
        self.is_async = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.is_async else None
        self._ready: dict[str, torch.cuda.Event | _NoEvent] = {}  # adapter -> its copy's event, while pending
        self._last_read: dict[int, torch.cuda.Event | _NoEvent] = {}  # slot -> the last step reading it

    def pending(self) -> set[str]:
        """Adapters whose copy no step has waited for yet."""
        return set(self._ready)

    def readers(self, slot: int) -> bool:
        """Whether a step read this slot since it was last written (a write must wait for it)."""
        return slot in self._last_read

    @contextlib.contextmanager
    def writing(self, adapter_id: str, slot: int) -> Iterator[bool]:
        """Around the writes of `adapter_id` into `slot` (global id); yields whether the copies may be
        non-blocking (they must then come from pinned memory)."""
        last_read = self._last_read.pop(slot, None)
        if self.stream is None:
            yield False
            self._ready[adapter_id] = _NoEvent()
            return
        if last_read is not None:
            last_read.wait(self.stream)  # the slot's readers first (write after read)
        with torch.cuda.stream(self.stream):
            yield True
            event = torch.cuda.Event()
            event.record(self.stream)
        self._ready[adapter_id] = event

    def wait_for(self, adapter_ids: Iterable[str]) -> list[str]:
        """Make the current stream wait for the pending copies of these adapters; returns which it waited for."""
        waited = []
        for adapter_id in adapter_ids:
            event = self._ready.pop(adapter_id, None)
            if event is not None:
                event.wait(torch.cuda.current_stream(self.device) if self.is_async else None)
                waited.append(adapter_id)
        return waited

    def record_use(self, slots: Iterable[int]) -> None:
        """After a step is issued: the slots it reads are read until this point of the main stream."""
        event: torch.cuda.Event | _NoEvent = torch.cuda.Event() if self.is_async else _NoEvent()
        if self.is_async:
            event.record(torch.cuda.current_stream(self.device))
        for slot in slots:
            self._last_read[slot] = event
