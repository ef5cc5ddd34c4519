"""What serving N adapters costs: one loranode (the base model once, the adapters in slots beside it)
against N dedicated copies of the base model (one per customer, the alternative an operator has).

Decoding is bound by memory bandwidth: a step reads the weights once for the whole batch, and each
sequence's KV cache. So a step takes (weights + adapters in the batch + KV read) / bandwidth, and a
copy's tokens/s is its batch over that, at the fraction of datasheet bandwidth a real step reaches.
loranode's step is that time times the multi-adapter overhead per byte; its GPU holds a device slot
for each adapter a batch can use (at most one per sequence), the others wait in host memory (their
copies to the device, a few ms each over PCIe, are not in the model). Both come from measurement
(bench/cost.py: from the GPU bench's base and 64-adapter steps when bench/results/gpu.json holds
them, else a step over N adapters against the same batch on the base model on this machine's CPU).
A dedicated copy serves only its adapter's share of the traffic, yet holds a whole GPU (or more,
when its share outgrows one copy's KV memory). $ per million tokens is GPU-hours over tokens.
Every input is printed with the figures (`loranode cost`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from node.errors import ConfigError

MEMORY_USE = 0.9  # of GPU memory for weights, adapters and KV cache (the rest: activations, workspace)


@dataclass(frozen=True)
class GPU:
    name: str
    memory_bytes: int
    bandwidth_bytes_s: float  # the datasheet's memory bandwidth
    price_per_hour: float  # USD, on-demand


# Memory and bandwidth: NVIDIA's datasheets. Prices: typical on-demand list prices per GPU-hour in
# 2025 (cloud GPU providers); pass --price-per-hour for yours.
GPUS = {
    "h100": GPU("H100 SXM 80GB", 80 * 10**9, 3.35e12, 2.99),
    "h200": GPU("H200 SXM 141GB", 141 * 10**9, 4.8e12, 3.79),
    "a100": GPU("A100 SXM 80GB", 80 * 10**9, 2.039e12, 1.79),
    "l40s": GPU("L40S 48GB", 48 * 10**9, 0.864e12, 0.99),
    "a10g": GPU("A10G 24GB", 24 * 10**9, 0.6e12, 1.01),
}


@dataclass(frozen=True)
class Workload:
    num_adapters: int
    concurrency: float  # sequences decoding at once, all adapters together
    shares: tuple[float, ...]  # each adapter's share of them (sums to 1)
    context_tokens: int  # the KV cache each sequence reads per step


@dataclass(frozen=True)
class ModelBytes:
    weights: int
    adapter: int  # one adapter's device slot
    kv_per_token: int


@dataclass(frozen=True)
class Deployment:
    num_gpus: int
    memory_bytes: int  # weights, adapters and KV in use
    tokens_per_s: float
    ms_per_token: float  # one sequence's time per token (the step time): what each stream sees
    usd_per_million_tokens: float


def mix(num_adapters: int, spec: str) -> tuple[float, ...]:
    """`uniform`, or `zipf:S` (adapter k gets a share proportional to 1 / k^S: a few hot customers)."""
    if spec == "uniform":
        weights = [1.0] * num_adapters
    elif spec.startswith("zipf:"):
        s = float(spec.removeprefix("zipf:"))
        weights = [1 / (k**s) for k in range(1, num_adapters + 1)]
    else:
        raise ConfigError(f"unknown traffic mix {spec!r}: uniform or zipf:S", mix=spec)
    total = sum(weights)
    return tuple(w / total for w in weights)


@dataclass(frozen=True)
class Measured:
    """What the model takes from measurement: the fraction of datasheet bandwidth a base-model step
    reaches, and how much slower per byte a step over many adapters runs than one on the base model."""

    bandwidth_efficiency: float
    adapter_overhead: float
    source: str


def _step_s(gpu: GPU, weights_bytes: float, batch: float, context: int, kv_per_token: int,
            efficiency: float) -> float:
    return (weights_bytes + batch * context * kv_per_token) / (gpu.bandwidth_bytes_s * efficiency)


def _max_batch(gpu: GPU, resident_bytes: int, w: Workload, m: ModelBytes) -> float:
    free = gpu.memory_bytes * MEMORY_USE - resident_bytes
    if free <= 0:
        raise ConfigError(f"the model and adapters ({resident_bytes} bytes) do not fit one {gpu.name}",
                          gpu=gpu.name, nbytes=resident_bytes)
    return free / (w.context_tokens * m.kv_per_token)


def loranode(gpu: GPU, w: Workload, m: ModelBytes, measured: Measured) -> Deployment:
    """The fewest GPUs whose memory holds the weights, a device slot for each adapter a batch can use
    (at most one per sequence: the others wait in host memory) and the batch's KV cache."""
    num_gpus = 1
    while True:
        batch = w.concurrency / num_gpus
        num_slots = min(w.num_adapters, math.ceil(batch))
        resident = m.weights + num_slots * m.adapter
        if num_slots == 1 or (resident < gpu.memory_bytes * MEMORY_USE and batch <= _max_batch(gpu, resident, w, m)):
            break
        num_gpus += 1
    if batch > _max_batch(gpu, resident, w, m):  # raises when the weights and one adapter alone do not fit
        raise ConfigError(f"one sequence's KV cache does not fit one {gpu.name} beside the model",
                          gpu=gpu.name, context_tokens=w.context_tokens)
    step = _step_s(gpu, resident, batch, w.context_tokens, m.kv_per_token,
                   measured.bandwidth_efficiency) * measured.adapter_overhead
    tokens_s = num_gpus * batch / step
    memory = num_gpus * (resident + batch * w.context_tokens * m.kv_per_token)
    return Deployment(num_gpus, int(memory), tokens_s, step * 1000, _usd_per_million(gpu, num_gpus, tokens_s))


def dedicated(gpu: GPU, w: Workload, m: ModelBytes, measured: Measured) -> Deployment:
    per_copy = _max_batch(gpu, m.weights, w, m)
    num_gpus, tokens_s, memory, weighted_step = 0, 0.0, 0.0, 0.0
    for share in w.shares:
        concurrency = w.concurrency * share
        copies = max(1, math.ceil(concurrency / per_copy))
        batch = concurrency / copies
        step = _step_s(gpu, m.weights, batch, w.context_tokens, m.kv_per_token, measured.bandwidth_efficiency)
        num_gpus += copies
        tokens_s += copies * batch / step
        weighted_step += share * step
        memory += copies * m.weights + concurrency * w.context_tokens * m.kv_per_token
    return Deployment(num_gpus, int(memory), tokens_s, weighted_step * 1000,
                      _usd_per_million(gpu, num_gpus, tokens_s))


def _usd_per_million(gpu: GPU, num_gpus: int, tokens_s: float) -> float:
    return num_gpus * gpu.price_per_hour / (tokens_s * 3600) * 1e6 if tokens_s > 0 else math.inf


def inputs(gpu: GPU, w: Workload, m: ModelBytes, measured: Measured) -> dict[str, object]:
    """Every figure the model used, for printing beside its answer."""
    return {"gpu": asdict(gpu), "memory_use": MEMORY_USE, "workload": asdict(w), "model_bytes": asdict(m),
            "measured": asdict(measured)}


# Llama 3 8B in bfloat16 (its config.json): 8.03e9 parameters; KV 2 x 32 layers x 8 heads x 128 x 2
# bytes per token; a rank-16 adapter on all seven projections: 32 x 16 x (sum of in + out) x 2 bytes.
LLAMA_3_8B_PROJECTIONS = ((4096, 4096), (4096, 1024), (4096, 1024), (4096, 4096), (4096, 14336),
                          (4096, 14336), (14336, 4096))


def llama_3_8b(rank: int) -> ModelBytes:
    adapter = 32 * rank * sum(i + o for i, o in LLAMA_3_8B_PROJECTIONS) * 2
    return ModelBytes(weights=int(8.03e9 * 2), adapter=adapter, kv_per_token=2 * 32 * 8 * 128 * 2)
