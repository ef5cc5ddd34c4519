"""An adapter's own chat template, rendered in worker processes with a time limit.

A chat template is code its adapter's owner wrote: transformers' jinja sandbox keeps it from reading
what it should not, not from running for ever. `{% for a in range(100000) %}{% for b in range(100000)
%}{% endfor %}{% endfor %}` renders for hours, and `{{ 3 ** 100000000 }}` holds the GIL in one C call
for minutes. The template is rendered before any hold (it counts the prompt the hold is sized by), so a
free request or quote naming such an adapter took an API thread for good, and the GIL for long spells,
until holds and charges stopped for everyone. So the API renders adapters' templates in `num_workers`
processes of their own: a render that takes longer than `max_render_s` is refused (400
chat_template_error, nothing held) and the workers are replaced; no more than `max_waiting` renders wait
at once (429 beyond: a flood of them never ties up the API's threads). The base model's own template is
the operator's, rendered in the API's process as before.
"""

from __future__ import annotations

import multiprocessing
import threading
from multiprocessing.pool import Pool
from typing import Any

from node.errors import ChatTemplateError, Overloaded, Unavailable

MAX_RENDER_S = 2.0
NUM_WORKERS = 2
STARTUP_S = 120.0  # a worker loads the tokenizer first

_tokenizer: Any = None  # in a worker: the base model's tokenizer


def _load(tokenizer_path: str) -> None:
    global _tokenizer
    from transformers import AutoTokenizer  # in the worker only

    _tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)


def _ping() -> bool:
    return True


def _render(messages: list[dict[str, Any]], template: str, tools: list[dict[str, Any]] | None) -> tuple[bool, str]:
    """(True, the prompt's text), or (False, why the template refused): in a worker."""
    try:
        text = _tokenizer.apply_chat_template(messages, chat_template=template, tools=tools, tokenize=False,
                                              add_generation_prompt=True)
    except Exception as exc:  # the template's fault, whatever it raised (it is the adapter owner's code)
        return False, f"{type(exc).__name__}: {str(exc)[:300]}"
    return True, str(text)


class TemplateRenderer:
    def __init__(self, tokenizer_path: str, *, num_workers: int = NUM_WORKERS, max_render_s: float = MAX_RENDER_S,
                 max_waiting: int = 2 * NUM_WORKERS) -> None:
        self.tokenizer_path, self.num_workers, self.max_render_s = tokenizer_path, num_workers, max_render_s
        self._slots = threading.BoundedSemaphore(max_waiting)
        self._pool: Pool | None = None  # started at the first render
        self._lock = threading.Lock()

    def render(self, messages: list[dict[str, Any]], template: str, tools: list[dict[str, Any]] | None) -> str:
        """The messages rendered with `template` (blocking: call it off the event loop)."""
        if not self._slots.acquire(blocking=False):
            raise Overloaded("too many adapter chat templates are being rendered; retry shortly", param="model")
        try:
            pool = self._workers()
            try:
                pending = pool.apply_async(_render, (messages, template, tools))
            except ValueError as exc:  # the pool was replaced meanwhile
                raise Unavailable("the chat template renderer was restarting; retry shortly") from exc
            try:
                is_ok, text = pending.get(self.max_render_s)
            except multiprocessing.TimeoutError:
                self._replace(pool)
                raise ChatTemplateError(f"the adapter's chat template took more than {self.max_render_s} s to "
                                        "render", param="model", timeout_s=self.max_render_s) from None
        finally:
            self._slots.release()
        if not is_ok:
            raise ChatTemplateError(f"the chat template refused these messages: {text}", param="messages")
        return text

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.terminate()
                self._pool = None

    def _workers(self) -> Pool:
        """The running workers, started (and waited for) if there are none."""
        with self._lock:
            if self._pool is None:
                pool = multiprocessing.get_context("spawn").Pool(self.num_workers, _load, (self.tokenizer_path,))
                try:  # a worker is up, its tokenizer loaded: renders are timed from here
                    pool.apply_async(_ping).get(STARTUP_S)
                except multiprocessing.TimeoutError:
                    pool.terminate()
                    raise Unavailable("the chat template renderer did not start", timeout_s=STARTUP_S) from None
                self._pool = pool
            return self._pool

    def _replace(self, pool: Pool) -> None:
        """Kill `pool`'s workers (a render in them runs away); the next render starts new ones."""
        with self._lock:
            if self._pool is pool:
                self._pool = None
        pool.terminate()
