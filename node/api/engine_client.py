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
import json
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

from jinja2 import TemplateError

from node.api.structured import tools_prompt
from node.api.template_render import TemplateRenderer
from node.engine import LLMEngine, SamplingParams
from node.engine.core_client import CoreClient
from node.engine.grammar import TOOL_CALL_BEGIN, TOOL_CALL_END, GrammarSpec
from node.engine.sequence import RequestOutput, StreamDelta
from node.errors import BadRequest, ChatTemplateError, NoChatTemplate, Overloaded, PromptTooLong

MAX_CHAT_TEMPLATE_CHARS = 64 << 10  # a chat template is untrusted input (an adapter's file): bounded
GRAMMAR_COMPILE_TIMEOUT_S = 5.0  # a schema that takes longer is refused (its compile ends in the background)
GRAMMAR_COMPILE_THREADS = 2  # compiles never run on the event loop nor hold more than these threads


class EngineClient:
    def __init__(self, engine: LLMEngine | CoreClient, max_in_flight: int) -> None:
        self.engine = engine
        self.max_in_flight = max_in_flight
        self._in_flight = 0
        self._lock = threading.Lock()
        self._token_texts: dict[int, str] = {}
        self._compiles = ThreadPoolExecutor(GRAMMAR_COMPILE_THREADS, thread_name_prefix="grammar")
        # long prompts are tokenized on threads of their own (as many as the loop's default executor has):
        # anyone's, a free quote's too, queue there, never in front of other requests' database work
        self.tokenizing = ThreadPoolExecutor(thread_name_prefix="tokenize")

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

    @property
    def cores_up(self) -> tuple[int, int] | None:
        """(engine cores up, engine cores) out of process; None with the engine in this process."""
        return (self.engine.num_up, self.engine.num_cores) if isinstance(self.engine, CoreClient) else None

    # --- prompts ----------------------------------------------------------------------------------
    def encode_completion(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, list):
            vocab = self.engine.model_config.vocab_size
            if not all(isinstance(t, int) and 0 <= t < vocab for t in prompt):
                raise BadRequest(f"prompt token ids must be integers in [0, {vocab})", param="prompt")
            return list(prompt)
        return self._encode(prompt)

    @property
    def has_chat_template(self) -> bool:
        """Whether the base model's tokenizer has a chat template (an adapter may bring its own)."""
        return bool(getattr(self.engine.tokenizer, "chat_template", None))

    def encode_chat(self, messages: list[dict[str, Any]], template: str | None = None,
                    tools: list[dict[str, Any]] | None = None) -> list[int]:
        """The messages rendered with `template` (the adapter's own), else the base model's chat template,
        in transformers' jinja sandbox; NoChatTemplate when there is neither (no format is invented).
        Tools go to the template when it renders them; otherwise they are offered in a first system
        message (structured.tools_prompt) and earlier calls are written as the text the model answers with."""
        if template is None and not self.has_chat_template:
            raise NoChatTemplate("this model has no chat template: use /v1/completions with a prompt you format",
                                 param="model")
        if template is not None and len(template) > MAX_CHAT_TEMPLATE_CHARS:
            raise ChatTemplateError(f"the adapter's chat template is over {MAX_CHAT_TEMPLATE_CHARS} characters",
                                    param="model", num_chars=len(template))
        active = template if template is not None else self.engine.tokenizer.chat_template
        if tools and not (isinstance(active, str) and "tools" in active):
            messages = [{"role": "system", "content": tools_prompt(tools)}, *map(_calls_as_text, messages)]
            tools = None
        if template is not None:  # the adapter owner's code: in worker processes, with a time limit
            return self._encode(self.templates.render(messages, template, tools))
        try:
            text = self.engine.tokenizer.apply_chat_template(messages, tools=None if tools is None else list(tools),
                                                             tokenize=False, add_generation_prompt=True)
        except (TemplateError, OverflowError, RecursionError, TypeError, ValueError) as exc:  # the template's fault
            raise ChatTemplateError(f"the chat template refused these messages: {str(exc)[:300]}",
                                    param="messages") from exc
        return self._encode(str(text))

    @functools.cached_property
    def templates(self) -> TemplateRenderer:
        """Where adapters' own chat templates are rendered (node/api/template_render.py)."""
        return TemplateRenderer(str(self.engine.tokenizer.name_or_path))

    async def compile_grammar(self, spec: GrammarSpec, param: str) -> None:
        """Compile (or find cached) the grammar before the request is generated: 400 naming `param` when
        it cannot compile, or takes longer than GRAMMAR_COMPILE_TIMEOUT_S."""
        if self.engine.grammars.is_cached(spec):
            return
        job = self._compiles.submit(self.engine.grammars.compile, spec)
        try:
            await asyncio.wait_for(asyncio.wrap_future(job), GRAMMAR_COMPILE_TIMEOUT_S)
        except TimeoutError as exc:
            raise BadRequest(f"{param}: the grammar took more than {GRAMMAR_COMPILE_TIMEOUT_S} s to compile",
                             param=param, timeout_s=GRAMMAR_COMPILE_TIMEOUT_S) from exc
        except BadRequest as exc:
            raise BadRequest(f"{param}: {exc.message}", **{**exc.facts, "param": param}) from exc

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

    def token_text(self, token_id: int) -> str:
        """A token's text alone (what logprobs name it by)."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = str(self.engine.tokenizer.decode([token_id]))
        return text

    def check_vocabulary(self, params: SamplingParams) -> None:
        """400 for token ids (logit_bias) outside the model's vocabulary: checked before any hold."""
        self.engine.check_vocabulary(params)

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
                     request_id: str, prefix_key: str | None = None) -> AsyncIterator[StreamDelta]:
        async for delta in self.engine.stream(prompt_ids, params, adapter_id, request_id, prefix_key):
            yield delta

    async def stream_choices(self, prompt_ids: list[int], params: list[SamplingParams], adapter_id: str | None,
                             request_ids: list[str]) -> AsyncGenerator[tuple[int, StreamDelta]]:
        """The deltas of n choices of one prompt as they come, each with its choice's index, until every
        choice has finished; they share their prompt's KV blocks. Closing the iterator early aborts the
        choices still running."""
        if len(request_ids) == 1:  # one choice: no hop through a queue
            async for delta in self.stream(prompt_ids, params[0], adapter_id, request_ids[0]):
                yield 0, delta
            return
        queue: asyncio.Queue[tuple[int, StreamDelta | BaseException]] = asyncio.Queue()

        async def pump(index: int) -> None:
            try:
                async for delta in self.stream(prompt_ids, params[index], adapter_id, request_ids[index],
                                               prefix_key=request_ids[0]):
                    queue.put_nowait((index, delta))
            except Exception as exc:  # a failed stream: handed to the reader below, which raises it
                queue.put_nowait((index, exc))

        pumps = [asyncio.ensure_future(pump(i)) for i in range(len(request_ids))]
        running = len(pumps)
        try:
            while running:
                index, item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                running -= item.finish_reason is not None
                yield index, item
        finally:
            for task in pumps:
                task.cancel()  # its engine.stream aborts its request if it has not finished
            if running:  # and in case a pump had not started yet
                for request_id in request_ids:
                    self.engine.abort(request_id)

    def submit(self, prompt_ids: list[int], params: SamplingParams, adapter_id: str | None,
               request_id: str, prefix_key: str | None = None,
               loop: asyncio.AbstractEventLoop | None = None) -> asyncio.Future[RequestOutput]:
        """Queue the request; the future gets its output once it finished, failed, or was aborted (then
        with what it had generated: see `abort`). `request_id` must be unique among requests in flight.
        From a thread other than the loop's, name the `loop` the future belongs to."""
        self.engine.start()
        loop = loop or asyncio.get_running_loop()
        finished: asyncio.Future[RequestOutput] = loop.create_future()

        def on_finish(output: RequestOutput) -> None:  # on the engine thread
            with contextlib.suppress(RuntimeError):  # the caller's event loop is closed: nobody waits
                loop.call_soon_threadsafe(_settle, finished, output)

        self.engine.add_request(prompt_ids, params, adapter_id, request_id, waiter=on_finish, prefix_key=prefix_key)
        return finished

    def abort(self, request_id: str) -> None:
        """End the request at the next step; it finishes with "abort" and the tokens it had generated."""
        self.engine.abort(request_id)


def _settle(future: asyncio.Future[RequestOutput], output: RequestOutput) -> None:
    if not future.done():
        future.set_result(output)


def _calls_as_text(message: dict[str, Any]) -> dict[str, Any]:
    """A message whose tool calls are written into its content, as the model is asked to write them."""
    calls = message.get("tool_calls") or []
    if not calls:
        return message
    written = (json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]}) for c in calls)
    text = "".join(f"{TOOL_CALL_BEGIN}{call}{TOOL_CALL_END}" for call in written)
    return {"role": message["role"], "content": (message.get("content") or "") + text}
