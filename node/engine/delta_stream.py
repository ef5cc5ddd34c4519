"""One request's stream deltas as an async iterator, for any engine that calls a listener per delta
(the in-process `LLMEngine` on its step thread, `CoreClient` on its socket thread)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Protocol

from node.engine.sampling import SamplingParams
from node.engine.sequence import StreamDelta


class StreamingEngine(Protocol):
    def add_request(self, prompt: str | list[int], params: SamplingParams, adapter_id: str | None = None,
                    request_id: str | None = None, *, listener: Callable[[StreamDelta], None] | None = None,
                    prefix_key: str | None = None) -> str: ...

    def abort(self, request_id: str) -> None: ...


async def stream_deltas(engine: StreamingEngine, prompt: str | list[int], params: SamplingParams,
                        adapter_id: str | None, request_id: str, prefix_key: str | None,
                        ) -> AsyncIterator[StreamDelta]:
    """Deltas as the engine produces them; the last one has finish_reason. Leaving early (the caller
    stopped reading, or its event loop closed) aborts the request."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[StreamDelta] = asyncio.Queue()

    def push(delta: StreamDelta) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, delta)
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
