"""Adapters for benchmarks that measure the engine, not the tiers: every adapter already in host
memory behind the provider port, and random LoRA weights of any rank for a model's targets."""

from __future__ import annotations

from concurrent.futures import Future

import torch

from node.lora.adapter import LoRATargetSpec, LoRAWeights
from node.lora.provider import AdapterSource, LoadState


class HostAdapters:
    """Every adapter in host memory already (the provider port, without tiers)."""

    def __init__(self, weights: dict[str, LoRAWeights]):
        self.weights = weights

    def register(self, adapter_id: str, source: AdapterSource) -> None: ...

    def unregister(self, adapter_id: str) -> None: ...

    def get(self, adapter_id: str) -> LoRAWeights:
        return self.weights[adapter_id]

    def prefetch(self, adapter_id: str) -> Future[object]:
        future: Future[object] = Future()
        future.set_result(self.weights[adapter_id])
        return future

    def state(self, adapter_id: str) -> LoadState:
        return LoadState.READY if adapter_id in self.weights else LoadState.UNKNOWN


def random_lora(target: LoRATargetSpec, rank: int, seed: int) -> LoRAWeights:
    """Rank-`rank` weights on every target module, scaled so that the delta stays small next to the
    base layer (A ~ 1/sqrt(d_in), B ~ 0.02/sqrt(rank))."""
    g = torch.Generator().manual_seed(seed)
    return LoRAWeights.from_modules({
        (layer, name): (torch.randn(rank, d_in, generator=g) / d_in ** 0.5,
                        torch.randn(d_out, rank, generator=g) * (0.02 / rank ** 0.5))
        for layer in range(target.num_layers) for name, (d_in, d_out) in target.module_shapes})
