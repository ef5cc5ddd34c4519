"""Data-parallel engine cores against one, and time to first token (bench/api.py runs it too).

`one_vs_two` runs the same load through `CoreClient.generate` on one core and on two (alternated,
best round of each), every core with `threads` torch threads: on a 2-CPU box two cores of one
thread each should come close to twice one core, less what the API process and the box take.
Beside tokens/s, the CPU ms per token of the cores and of this (the client's) process, the least over
the rounds (bench/cpu_meter.py): the load of a shared box moves the wall clock, not these.

    python bench/engine_cores.py [--rounds 3] [--requests 128] [--threads-per-core 1] [--wait-policies]
runs it alone (a tiny model and 8 adapters of its own, no chain, no database) and writes
bench/results/engine_cores.json.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# torch's OpenMP threads sleep between parallel regions, in this process (the in-process engine) as in
# the core processes (node/engine/core_supervisor.py): same threads, same policy (set
# OMP_WAIT_POLICY in the environment to measure another).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from cpu_meter import CPUMeter  # noqa: E402

from node.api.wiring import engine_config  # noqa: E402
from node.config import Settings  # noqa: E402
from node.engine import LLMEngine, SamplingParams  # noqa: E402
from node.engine.core_client import CoreClient  # noqa: E402

STOP_NEVER = "@@never@@"
Engine = LLMEngine | CoreClient


def percentiles(times_ms: list[float]) -> dict[str, float]:
    ordered = sorted(times_ms)
    return {"p50": statistics.median(ordered), "p99": ordered[int(0.99 * (len(ordered) - 1))], "n": len(ordered)}


def ttft(engine: Engine, ids: list[int] | list[str], n: int, prompt: list[int], new: int,
         concurrency: int) -> dict[str, float]:
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


def throughput(engine: Engine, ids: list[int] | list[str], n: int, prompt: list[int], new: int,
               with_tokens: bool = False) -> Any:
    """tokens/s of `n` requests (with `with_tokens`: and the tokens)."""
    params = SamplingParams(max_tokens=new, temperature=0, stop=(STOP_NEVER,))
    started = time.perf_counter()
    outs = engine.generate([prompt] * n, params, [str(ids[i % len(ids)]) for i in range(n)])
    tokens = sum(o.num_completion_tokens for o in outs)
    rate = tokens / (time.perf_counter() - started)
    return (rate, tokens) if with_tokens else rate


def one_vs_two(settings: Settings, register: Callable[[Engine], None], ids: list[int] | list[str], n: int,
               prompt: list[int], new: int, rounds: int, threads: int) -> dict[str, Any]:
    """tokens/s and TTFT of one core and of two, `threads` torch threads each (best of `rounds`), and the
    CPU ms per token of the cores and of this process (the least of the rounds)."""
    config = engine_config(settings)
    clients = {size: CoreClient(config, num_cores=size, num_threads=threads) for size in (1, 2)}
    try:
        for client in clients.values():
            client.start()
            register(client)
            throughput(client, ids, 8, prompt, 4)  # warm up
        best = dict.fromkeys(clients, 0.0)
        cpu: dict[int, dict[str, float]] = {size: {} for size in clients}
        split: dict[int, list[int]] = {}  # requests each core took in the last round
        busy: dict[int, list[float]] = {}  # each core's CPU seconds over the wall clock, the last round
        every: dict[int, list[float]] = {size: [] for size in clients}  # tokens/s of each round
        for _ in range(rounds):
            for size, client in clients.items():
                each = {f"core {core}": functools.partial(lambda c, k: [c.pids()[k]], client, core)
                        for core in range(size)}
                meter = CPUMeter({"cores": client.pids, "client (this process)": [os.getpid()], **each})
                routed = list(client.num_routed)
                started = time.perf_counter()
                with meter:
                    tokens_per_s, tokens = throughput(client, ids, n, prompt, new, with_tokens=True)
                wall = time.perf_counter() - started
                split[size] = [now - before for now, before in zip(client.num_routed, routed, strict=True)]
                busy[size] = [round(meter.seconds[name] / wall, 2) for name in each]
                for name in each:
                    del meter.seconds[name]
                best[size] = max(best[size], tokens_per_s)
                every[size].append(round(tokens_per_s, 1))
                for process, seconds in meter.seconds.items():
                    cpu[size][process] = min(cpu[size].get(process, float("inf")), 1000 * seconds / tokens)
        ttfts = {size: ttft(client, ids, n, prompt, new, 16) for size, client in clients.items()}
    finally:
        for client in clients.values():
            client.shutdown()
    one, two = sum(cpu[1].values()), sum(cpu[2].values())
    return {"threads_per_core": threads, "one_core_tokens_per_s": best[1], "two_cores_tokens_per_s": best[2],
            "two_over_one": best[2] / best[1],
            "rounds_tokens_per_s": {"one core": every[1], "two cores": every[2]},
            "ttft_ms": {"one core": ttfts[1], "two cores": ttfts[2]},
            "cpu_ms_per_token": {"one core": cpu[1], "two cores": cpu[2]}, "two_cores_split": split[2],
            "cores_cpu_over_wall_clock": {"one core": busy[1], "two cores": busy[2]},
            # two cores' tokens/s over one's on a box whose every CPU is busy with them and nothing else
            "cpu_bound_two_over_one": 2 * one / two if two else float("nan")}


def wait_policies(settings: Settings, register: Callable[[Engine], None], ids: list[str], n: int,
                  prompt: list[int], new: int, rounds: int) -> dict[str, dict[str, float]]:
    """One core with torch's default threads, its OpenMP threads spinning between parallel regions
    (OMP_WAIT_POLICY=ACTIVE) against sleeping (PASSIVE: what the supervisor gives cores), alternated:
    best tokens/s and least CPU ms per token of each. (libgomp's default, unset, spins a while first.)"""
    config = engine_config(settings)
    clients: dict[str, CoreClient] = {}
    saved = os.environ.get("OMP_WAIT_POLICY")
    try:
        for policy in ("ACTIVE", "PASSIVE"):
            os.environ["OMP_WAIT_POLICY"] = policy  # read by the core process when it starts
            clients[policy] = CoreClient(config, num_cores=1)
            clients[policy].start()
            register(clients[policy])
            throughput(clients[policy], ids, 8, prompt, 4)  # warm up
    finally:
        os.environ["OMP_WAIT_POLICY"] = saved or "PASSIVE"
    out = {policy: {"tokens_per_s": 0.0, "cpu_ms_per_token": float("inf")} for policy in clients}
    try:
        for _ in range(rounds):
            for policy, client in clients.items():
                meter = CPUMeter({"core": client.pids})
                with meter:
                    tokens_per_s, tokens = throughput(client, ids, n, prompt, new, with_tokens=True)
                best = out[policy]
                best["tokens_per_s"] = max(best["tokens_per_s"], tokens_per_s)
                best["cpu_ms_per_token"] = min(best["cpu_ms_per_token"], 1000 * meter.seconds["core"] / tokens)
    finally:
        for client in clients.values():
            client.shutdown()
    return out


def print_table(dp: dict[str, Any]) -> None:
    print(f"data parallel, {dp['threads_per_core']} torch thread(s) per core: one core "
          f"{dp['one_core_tokens_per_s']:.1f} tokens/s, two cores {dp['two_cores_tokens_per_s']:.1f} tokens/s: "
          f"{dp['two_over_one']:.2f}x (target >= 1.6x); requests per core in a round of two: {dp['two_cores_split']}, "
          f"each core's CPU over the wall clock: {dp['cores_cpu_over_wall_clock']}")
    print(f"  tokens/s round by round: {dp['rounds_tokens_per_s']}")
    for system, t in dp["ttft_ms"].items():
        print(f"  time to first token, {system}: p50 {t['p50']:.1f} ms, p99 {t['p99']:.1f} ms")
    for system, per in dp.get("cpu_ms_per_token", {}).items():
        print(f"  CPU ms per token, {system}: " + ", ".join(f"{k} {v:.3f}" for k, v in per.items()))
    if "cpu_bound_two_over_one" in dp:
        print(f"  CPU-bound two over one (2 x CPU per token of one / of two): {dp['cpu_bound_two_over_one']:.2f}x")


def main() -> None:
    from node.config import load_settings
    from node.devkit import make_tiny_model, train_tiny_adapter
    from node.devkit.corpus import STYLES

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads-per-core", type=int, default=1)
    ap.add_argument("--wait-policies", action="store_true",
                    help="also one core (default threads) with OMP_WAIT_POLICY=ACTIVE against PASSIVE")
    args = ap.parse_args()
    load = [subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = make_tiny_model(work / "model", hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4,
                                vocab_size=2000)
        adapters = {str(i + 1): train_tiny_adapter(model, work / f"adapter-{i}", [STYLES["sea"]], rank=8, steps=1,
                                                   seed=i).path for i in range(8)}
        settings = load_settings(model_path=model, max_num_seqs=64, max_adapter_slots=8, data_dir=work / "data")

        def register(engine: Engine) -> None:
            for name, path in adapters.items():
                engine.add_adapter(name, str(path))

        result = one_vs_two(settings, register, list(adapters), args.requests, list(range(10, 42)), args.new_tokens,
                            args.rounds, args.threads_per_core)
        if args.wait_policies:
            result["wait_policies"] = wait_policies(settings, register, list(adapters), args.requests,
                                                    list(range(10, 42)), args.new_tokens, args.rounds)
    load.append(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    result |= {"requests": args.requests, "new_tokens": args.new_tokens, "rounds": args.rounds, "uptime": load}
    print_table(result)
    for policy, r in result.get("wait_policies", {}).items():
        print(f"one core, OMP_WAIT_POLICY={policy}: {r['tokens_per_s']:.1f} tokens/s, "
              f"{r['cpu_ms_per_token']:.3f} CPU ms per token")
    for line in load:
        print(f"uptime: {line}")
    out = ROOT / "bench" / "results" / "engine_cores.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
