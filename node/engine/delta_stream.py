"""One request's stream deltas as an async iterator, for any engine that calls a listener per delta
(the in-process `LLMEngine` on its step thread, `CoreClient` on its socket thread).

The deltas of one engine step reach the event loop together: the first one of a batch wakes the loop,
the rest join it (`LoopInbox`), so 64 streams cost one wake-up per step instead of 64 (each a
`call_soon_threadsafe`: a handle, a lock and a write to the loop's self-pipe)."""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Protocol

from node.engine.sampling import SamplingParams
from node.engine.sequence import StreamDelta


class StreamingEngine(Protocol):
    def add_request(self, prompt: str | list[int], params: SamplingParams, adapter_id: str | None = None,
                    request_id: str | None = None, *, listener: Callable[[StreamDelta], None] | None = None,
                    prefix_key: str | None = None) -> str: ...

    def abort(self, request_id: str) -> None: ...


class LoopInbox:
    """Deltas handed over from another thread to queues on one event loop, one wake-up per batch."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._waiting: list[tuple[asyncio.Queue[StreamDelta], StreamDelta]] = []

    def put(self, queue: asyncio.Queue[StreamDelta], delta: StreamDelta) -> None:
        """Raises RuntimeError if the loop is closed (nobody is listening any more)."""
        with self._lock:
            self._waiting.append((queue, delta))
            if len(self._waiting) > 1:  # a wake-up is on its way: it takes this one too
                return
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:
            with self._lock:
                self._waiting.clear()
            raise

    def _deliver(self) -> None:
        with self._lock:
            waiting, self._waiting = self._waiting, []
        for queue, delta in waiting:
            queue.put_nowait(delta)


_inboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopInbox] = weakref.WeakKeyDictionary()
_inboxes_lock = threading.Lock()


def inbox_of(loop: asyncio.AbstractEventLoop) -> LoopInbox:
    with _inboxes_lock:
        inbox = _inboxes.get(loop)
        if inbox is None:
            inbox = _inboxes[loop] = LoopInbox(loop)
        return inbox


async def stream_deltas(engine: StreamingEngine, prompt: str | list[int], params: SamplingParams,
                        adapter_id: str | None, request_id: str, prefix_key: str | None,
                        ) -> AsyncIterator[StreamDelta]:
    """Deltas as the engine produces them; the last one has finish_reason. Leaving early (the caller
    stopped reading, or its event loop closed) aborts the request."""
    inbox = inbox_of(asyncio.get_running_loop())
    queue: asyncio.Queue[StreamDelta] = asyncio.Queue()

    def push(delta: StreamDelta) -> None:
        try:
            inbox.put(queue, delta)
        except RuntimeError:  # the caller's event loop is closed: nobody is listening any more
            engine.abort(request_id)

    engine.add_request(prompt, params, adapter_id, request_id, listener=push, prefix_key=prefix_key)
    finished = False
    try:
        while not finished:
            delta = await queue.get()
            finished = delta.finish_reason is not None
            yield delta
    finally:
        if not finished:
            engine.abort(request_id)
