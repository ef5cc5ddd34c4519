"""The inference engine: paged KV cache, continuous batching, mixed-adapter LoRA.

Imports torch and nothing of the service.
"""

from node.engine.config import EngineConfig
from node.engine.llm_engine import LLMEngine
from node.engine.sampling import SamplingParams
from node.engine.sequence import RequestOutput, StreamDelta

__all__ = ["EngineConfig", "LLMEngine", "RequestOutput", "SamplingParams", "StreamDelta"]
