"""The inference engine: paged KV cache, continuous batching, mixed-adapter LoRA.

Imports torch and nothing of the service. The public names load on first use, so that a process
that needs one module of the engine (a tensor-parallel worker) does not import the tokenizer stack.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from node.engine.config import EngineConfig
    from node.engine.llm_engine import LLMEngine
    from node.engine.sampling import SamplingParams
    from node.engine.sequence import RequestOutput, StreamDelta

_HOMES = {"EngineConfig": "node.engine.config", "LLMEngine": "node.engine.llm_engine",
          "SamplingParams": "node.engine.sampling", "RequestOutput": "node.engine.sequence",
          "StreamDelta": "node.engine.sequence"}
__all__ = ["EngineConfig", "LLMEngine", "RequestOutput", "SamplingParams", "StreamDelta"]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
