"""The engine's frozen configuration."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from node.errors import ConfigError

QUANTIZATIONS = ("none", "int8", "int4", "fp8")  # node/models/quant.py
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class EngineConfig:
    model_path: str | Path
    device: str = "cpu"  # "cpu" or "cuda" (or "cuda:N")
    dtype: str = "float32"  # "float32", "bfloat16" or "float16"
    max_num_seqs: int = 256  # running sequences at once
    max_num_batched_tokens: int = 4096  # tokens through the model per step
    block_size: int = 16  # tokens per KV cache block
    prefix_caching: bool = True  # full KV blocks stay cached by content (adapter + tokens) for later prompts
    num_kv_blocks: int | None = None  # None: sized from memory
    max_lora_rank: int = 16
    max_adapter_slots: int = 32  # adapters resident on the device at once (distinct adapters per step)
    max_adapter_memory_bytes: int | None = None  # device bytes for adapter slots; caps the slot count
    # (rank, num_slots) pools, so that an adapter pays for its own rank; () = one pool at max_lora_rank.
    # The largest rank must be max_lora_rank; max_adapter_slots does not apply.
    adapter_rank_pools: tuple[tuple[int, int], ...] = ()
    max_model_len: int | None = None  # None: the model's max positions, at most 4096
    kv_cache_memory_fraction: float = 0.85  # on CUDA, of the free memory after loading the model
    max_cpu_kv_cache_bytes: int = 2 << 30  # on CPU, the cap on the KV cache
    seed: int = 0  # for requests that sample without a seed of their own
    cuda_graphs: bool = True  # on CUDA (with Triton), replay decode steps from graphs per batch-size bucket
    weight_quantization: str = "none"  # "none", "int8", "int4" (weight-only) or "fp8" (node/models/quant.py)
    # ranks the model is split across (Megatron-style, node/models/parallel.py): one device each on
    # CUDA (device, device + 1, ...), processes sharing the cores on the CPU
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {sorted(DTYPES)}", dtype=self.dtype)
        if self.weight_quantization not in QUANTIZATIONS:
            raise ConfigError(f"weight_quantization must be one of {QUANTIZATIONS}",
                              weight_quantization=self.weight_quantization)
        if not self.device.startswith(("cpu", "cuda")):
            raise ConfigError("device must be cpu or cuda", device=self.device)
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "max_lora_rank",
                     "max_adapter_slots", "tensor_parallel_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1", **{name: getattr(self, name)})
        pools = self.adapter_rank_pools
        if pools:
            ranks = [rank for rank, _ in pools]
            if min(min(p) for p in pools) < 1 or len(set(ranks)) != len(ranks):
                raise ConfigError("adapter_rank_pools: distinct ranks, each with at least 1 slot", pools=str(pools))
            if max(ranks) != self.max_lora_rank:
                raise ConfigError("adapter_rank_pools: the largest pool's rank must be max_lora_rank",
                                  pools=str(pools), max_lora_rank=self.max_lora_rank)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]
