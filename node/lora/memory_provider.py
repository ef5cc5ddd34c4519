"""The simplest `AdapterProvider`: adapters added from local folders, parsed once, kept in host memory."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Generic, TypeVar

from node.errors import AdapterError, AdapterNotFound
from node.lora.chat_template_file import read_chat_template
from node.lora.provider import AdapterSource, LoadState

W = TypeVar("W")


class InMemoryAdapterProvider(Generic[W]):
    """Loads synchronously on `get`/`prefetch`; what `LLMEngine.add_adapter` uses by default."""

    def __init__(self, parse: Callable[[Path], W]):
        self._parse = parse
        self._sources: dict[str, AdapterSource] = {}
        self._weights: dict[str, W] = {}
        self._errors: dict[str, AdapterError] = {}
        self._lock = threading.Lock()

    def register(self, adapter_id: str, source: AdapterSource) -> None:
        with self._lock:
            self._sources[adapter_id] = source
            self._weights.pop(adapter_id, None)
            self._errors.pop(adapter_id, None)

    def unregister(self, adapter_id: str) -> None:
        with self._lock:
            self._sources.pop(adapter_id, None)
            self._weights.pop(adapter_id, None)
            self._errors.pop(adapter_id, None)

    def get(self, adapter_id: str) -> W:
        with self._lock:
            if adapter_id in self._weights:
                return self._weights[adapter_id]
            source = self._sources.get(adapter_id)
        if source is None:
            raise AdapterNotFound(f"adapter {adapter_id} is not registered", adapter=adapter_id)
        try:
            weights = self._parse(Path(source.uri.removeprefix("file://")))
        except AdapterError as e:
            with self._lock:
                self._errors[adapter_id] = e
            raise
        with self._lock:
            if adapter_id in self._sources:
                self._weights[adapter_id] = weights
        return weights

    def chat_template(self, adapter_id: str) -> str | None:
        """The adapter folder's own chat template (None: it has none, or the adapter is not registered)."""
        with self._lock:
            source = self._sources.get(adapter_id)
        return None if source is None else read_chat_template(Path(source.uri.removeprefix("file://")))

    def prefetch(self, adapter_id: str) -> Future[object]:
        future: Future[object] = Future()
        try:
            future.set_result(self.get(adapter_id))
        except AdapterError as e:
            future.set_exception(e)
        return future

    def state(self, adapter_id: str) -> LoadState:
        with self._lock:  # loads run inline in `get`: never LOADING
            return LoadState.of(adapter_id, registered=self._sources, ready=self._weights, loading=(),
                                failed=self._errors)

    def error(self, adapter_id: str) -> Exception | None:
        with self._lock:
            return self._errors.get(adapter_id)
