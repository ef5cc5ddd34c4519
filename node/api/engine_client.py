"""The only bridge from the API to the engine: prompts to token ids, bounded admission, streaming.

The engine is either `LLMEngine` in this process (its step loop on a thread of its own) or a
`CoreClient` over engine core processes (`loranode api`'s default: `engine_process`); both take
requests and hand back outputs the same way, so nothing past this module knows which it is.
`stream` hands the API an async iterator of deltas (one event-loop wake-up per token); `submit` a
future of the finished request only (one wake-up per request: what a plain, unstreamed answer
needs). `abort` ends a request early; it then finishes with what it had generated, which is what a
client that left is charged for.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

from node.engine import LLMEngine, SamplingParams
from node.engine.core_client import CoreClient
from node.engine.sequence import RequestOutput, StreamDelta
from node.errors import BadRequest, Overloaded, PromptTooLong

CHAT_FALLBACK_TEMPLATE = "<|{role}|>\n{content}\n"


class EngineClient:
    def __init__(self, engine: LLMEngine | CoreClient, max_in_flight: int) -> None:
        self.engine = engine
        self.max_in_flight = max_in_flight
        self._in_flight = 0
        self._lock = threading.Lock()

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def is_serving(self) -> bool:
        """An engine core is up to take requests (always, in process)."""
        return not isinstance(self.engine, CoreClient) or self.engine.num_up > 0

    # --- prompts ----------------------------------------------------------------------------------
    def encode_completion(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, list):
            vocab = self.engine.model_config.vocab_size
            if not all(isinstance(t, int) and 0 <= t < vocab for t in prompt):
                raise BadRequest(f"prompt token ids must be integers in [0, {vocab})", param="prompt")
            return list(prompt)
        return self._encode(prompt)

    def encode_chat(self, messages: list[tuple[str, str]]) -> list[int]:
        tok = self.engine.tokenizer
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template([{"role": r, "content": c} for r, c in messages], tokenize=False,
                                           add_generation_prompt=True)
        else:
            text = "".join(CHAT_FALLBACK_TEMPLATE.format(role=r, content=c) for r, c in messages) + "<|assistant|>\n"
        return self._encode(str(text))

    @functools.cached_property
    def max_prompt_chars(self) -> int:
        """No text longer than this can fit the context: each token stands for at most as many characters
        as its longest vocabulary entry (a byte-level or byte-fallback entry spells at least one
        character per byte), so a longer prompt is refused before anyone spends time tokenizing it."""
        longest = max((len(token) for token in self.engine.tokenizer.get_vocab()), default=1)
        return self.max_model_len * max(longest, 1)

    def _encode(self, text: str) -> list[int]:
        if len(text) > self.max_prompt_chars:
            raise PromptTooLong(f"the prompt has {len(text)} characters; no prompt over {self.max_prompt_chars} "
                                f"fits this model's {self.max_model_len} tokens", num_chars=len(text),
                                max_chars=self.max_prompt_chars, max_model_len=self.max_model_len)
        ids = list(self.engine.tokenizer(text).input_ids)
        if not ids:
            raise BadRequest("the prompt is empty", param="prompt")
        return ids

    def completion_budget(self, num_prompt_tokens: int, max_tokens: int | None, default: int) -> int:
        """max_tokens for this prompt: what was asked, or the default, within the context window."""
        room = self.max_model_len - num_prompt_tokens
        if room < 1:
            raise PromptTooLong(f"the prompt has {num_prompt_tokens} tokens; this model takes at most "
                                f"{self.max_model_len - 1}", num_prompt_tokens=num_prompt_tokens,
                                max_model_len=self.max_model_len)
        if max_tokens is not None and max_tokens > room:
            raise BadRequest(f"max_tokens {max_tokens} + {num_prompt_tokens} prompt tokens exceed the context of "
                             f"{self.max_model_len}", param="max_tokens", room=room)
        return max_tokens if max_tokens is not None else min(default, room)

    # --- running ----------------------------------------------------------------------------------
    @contextmanager
    def admission(self) -> Iterator[None]:
        """A place among the requests in flight, or 429 when the queue is full."""
        with self._lock:
            if self._in_flight >= self.max_in_flight:
                raise Overloaded("the node is at capacity; retry shortly", in_flight=self._in_flight,
                                 max_in_flight=self.max_in_flight)
            self._in_flight += 1
        try:
            yield
        finally:
            with self._lock:
                self._in_flight -= 1

    async def stream(self, prompt_ids: list[int], params: SamplingParams, adapter_id: str | None,
                     request_id: str) -> AsyncIterator[StreamDelta]:
        async for delta in self.engine.stream(prompt_ids, params, adapter_id, request_id):
            yield delta

    def submit(self, prompt_ids: list[int], params: SamplingParams, adapter_id: str | None,
               request_id: str) -> asyncio.Future[RequestOutput]:
        """Queue the request; the future gets its output once it finished, failed, or was aborted (then
        with what it had generated: see `abort`). `request_id` must be unique among requests in flight."""
        self.engine.start()
        loop = asyncio.get_running_loop()
        finished: asyncio.Future[RequestOutput] = loop.create_future()

        def on_finish(output: RequestOutput) -> None:  # on the engine thread
            with contextlib.suppress(RuntimeError):  # the caller's event loop is closed: nobody waits
                loop.call_soon_threadsafe(_settle, finished, output)

        self.engine.add_request(prompt_ids, params, adapter_id, request_id, waiter=on_finish)
        return finished

    def abort(self, request_id: str) -> None:
        """End the request at the next step; it finishes with "abort" and the tokens it had generated."""
        self.engine.abort(request_id)


def _settle(future: asyncio.Future[RequestOutput], output: RequestOutput) -> None:
    if not future.done():
        future.set_result(output)
