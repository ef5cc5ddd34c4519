"""AdapterLoads: the adapter loads in flight, and what the scheduler asks of them.

The scheduler never waits on a load: it asks whether a waiting request's adapter is in host memory
(`is_ready`, which starts its load if none runs), whether its load failed (`error`), starts the loads
of the adapters next in line (`start`), and, when nothing else can run, waits briefly for any load
to end (`wait_any`). The futures of the loads it started are kept here, one per adapter, so that a
load is asked of the provider once, not once per step. Part of `LoRAManager` (node/lora/manager.py).
"""

from __future__ import annotations

from concurrent.futures import FIRST_COMPLETED, Future, wait

from node.errors import AdapterError, NodeError
from node.lora.provider import AdapterProvider, LoadState


class AdapterLoads:
    def __init__(self, provider: AdapterProvider[object]) -> None:
        self.provider = provider
        self._loads: dict[str, Future[object]] = {}

    def start(self, adapter_id: str) -> None:
        """Load it into host memory in the background unless it is there or loading. No lock is taken
        while a load started here runs."""
        load = self._loads.get(adapter_id)
        if load is not None and not load.done():
            return
        state = self.provider.state(adapter_id)
        if state is LoadState.READY:
            self._loads.pop(adapter_id, None)
        elif state is LoadState.COLD or (state is LoadState.LOADING and load is None):
            self._loads[adapter_id] = self.provider.prefetch(adapter_id)

    def is_ready(self, adapter_id: str) -> bool:
        """Whether it is in host memory; if not, its load is running (started now if none was)."""
        if self.provider.state(adapter_id) is LoadState.READY:
            self._loads.pop(adapter_id, None)
            return True
        load = self._loads.get(adapter_id)
        if load is None or load.done():  # a load that finished but was evicted before it was used
            self._loads[adapter_id] = self.provider.prefetch(adapter_id)
        return False

    def error(self, adapter_id: str) -> NodeError | None:
        """Why its requests fail: removed, or its last load failed (the load's own error if typed)."""
        state = self.provider.state(adapter_id)
        if state is LoadState.UNKNOWN:
            return AdapterError(f"adapter {adapter_id} was removed", adapter=adapter_id)
        if state is not LoadState.FAILED:
            return None
        future = self._loads.get(adapter_id)
        error = future.exception() if future is not None and future.done() else None
        if isinstance(error, NodeError):
            return error
        return AdapterError(f"adapter {adapter_id} failed to load", adapter=adapter_id)

    def wait_any(self, timeout_s: float) -> None:
        """Wait until one load ends, at most `timeout_s` (nothing to wait for: return at once)."""
        pending = [f for f in self._loads.values() if not f.done()]
        if pending:
            wait(pending, timeout=timeout_s, return_when=FIRST_COMPLETED)
