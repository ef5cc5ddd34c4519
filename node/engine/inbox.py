"""The messages other threads post to `LLMEngine`'s step loop, applied in order at the start of a step.

Each is a small typed value (never a convention on a request id): a new `Sequence`, an `Abort`, a
`DropAdapter`, or an operator's `ControlAdapter` (pin, unpin, preload, evict; node/lora/manager.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from node.engine.sequence import Sequence
from node.lora.manager import ControlAdapter


@dataclass(frozen=True)
class Abort:
    """End a request at the next step (it finishes with "abort")."""

    request_id: str


@dataclass(frozen=True)
class DropAdapter:
    """Abort the adapter's requests, then unregister it and free its device slot."""

    adapter_id: str


InboxMessage = Sequence | Abort | DropAdapter | ControlAdapter
