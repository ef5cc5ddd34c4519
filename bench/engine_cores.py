"""Data-parallel engine cores against one, and time to first token, for bench/api.py.

`one_vs_two` runs the same load through `CoreClient.generate` on one core and on two (alternated,
best round of each), every core with `threads` torch threads: on a 2-CPU box two cores of one
thread each should come close to twice one core, less what the API process and the box take.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from typing import Any

from node.api.wiring import engine_config
from node.config import Settings
from node.engine import LLMEngine, SamplingParams
from node.engine.core_client import CoreClient

STOP_NEVER = "@@never@@"
Engine = LLMEngine | CoreClient


def percentiles(times_ms: list[float]) -> dict[str, float]:
    ordered = sorted(times_ms)
    return {"p50": statistics.median(ordered), "p99": ordered[int(0.99 * (len(ordered) - 1))], "n": len(ordered)}


def ttft(engine: Engine, ids: list[int], n: int, prompt: list[int], new: int, concurrency: int) -> dict[str, float]:
    """Time to the first delta (ms) of `n` streamed requests, `concurrency` in flight."""
    params = SamplingParams(max_tokens=new, temperature=0, stop=(STOP_NEVER,))

    async def run() -> list[float]:
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(n):
            queue.put_nowait(i)
        times: list[float] = []

        async def worker() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                started, first = time.perf_counter(), None
                async for _delta in engine.stream(prompt, params, str(ids[i % len(ids)])):
                    first = first or time.perf_counter()
                times.append(((first or time.perf_counter()) - started) * 1000)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return times

    return percentiles(asyncio.run(run()))


def throughput(engine: Engine, ids: list[int], n: int, prompt: list[int], new: int) -> float:
    params = SamplingParams(max_tokens=new, temperature=0, stop=(STOP_NEVER,))
    started = time.perf_counter()
    outs = engine.generate([prompt] * n, params, [str(ids[i % len(ids)]) for i in range(n)])
    return sum(o.num_completion_tokens for o in outs) / (time.perf_counter() - started)


def one_vs_two(settings: Settings, register: Callable[[Engine], None], ids: list[int], n: int, prompt: list[int],
               new: int, rounds: int, threads: int) -> dict[str, Any]:
    """tokens/s and TTFT of one core and of two, `threads` torch threads each (best of `rounds`)."""
    config = engine_config(settings)
    clients = {size: CoreClient(config, num_cores=size, num_threads=threads) for size in (1, 2)}
    try:
        for client in clients.values():
            client.start()
            register(client)
            throughput(client, ids, 8, prompt, 4)  # warm up
        best = dict.fromkeys(clients, 0.0)
        for _ in range(rounds):
            for size, client in clients.items():
                best[size] = max(best[size], throughput(client, ids, n, prompt, new))
        ttfts = {size: ttft(client, ids, n, prompt, new, 16) for size, client in clients.items()}
    finally:
        for client in clients.values():
            client.shutdown()
    return {"threads_per_core": threads, "one_core_tokens_per_s": best[1], "two_cores_tokens_per_s": best[2],
            "two_over_one": best[2] / best[1], "ttft_ms": {"one core": ttfts[1], "two cores": ttfts[2]}}


def print_table(dp: dict[str, Any]) -> None:
    print(f"data parallel, {dp['threads_per_core']} torch thread(s) per core: one core "
          f"{dp['one_core_tokens_per_s']:.1f} tokens/s, two cores {dp['two_cores_tokens_per_s']:.1f} tokens/s: "
          f"{dp['two_over_one']:.2f}x (target >= 1.6x)")
    for system, t in dp["ttft_ms"].items():
        print(f"  time to first token, {system}: p50 {t['p50']:.1f} ms, p99 {t['p99']:.1f} ms")
