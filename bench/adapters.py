"""Adapter store benchmark: disk->host load time against peft's `load_adapter`, and host hit rates.

    python bench/adapters.py                    # 5,000 adapters, host cache for 500
    python bench/adapters.py --quick            # 600 adapters, host cache for 60, fewer requests
    python bench/adapters.py --section engine --num-adapters 1000   # the engine section only

The engine section (bench/adapters_engine.py) serves the same adapters through LLMEngine over the
store, against all-adapters-resident; `--section engine` keeps the store rows already in the JSON.

The adapters are rank 8 on q, k, v, o of the engine benchmark's model (Llama, hidden 512, 8 layers,
MHA), float32, about 1 MiB each, written straight into the store's disk cache. Measured in one run:
- store disk->host: `AdapterStore.get` of an adapter on disk but not in host memory, in a new store
  (the cache is trusted and each entry was vetted by its first load: config and header read and
  checked, one preadv into the per-group stacks, no hash, no finiteness pass), timed around the call;
- the same with `verify_every_load` (every load hashes the files again), paired with peft the same way;
- store source->host: the same from a local registry folder not yet in the disk cache, and from
  the same folder served over HTTP on 127.0.0.1;
- peft: `PeftModel.load_adapter` of the same folders into a randomly initialised base model,
  each paired with the store's load of the same adapter (alternating which goes first);
- traffic: Zipf(1.1) and uniform requests over all adapters through `get`, host cache for 500.
Prints a table and writes bench/results/adapters.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adapter_population import (
    ADAPTER_BYTES,
    HIDDEN,
    MODULES,
    NUM_HEADS,
    NUM_LAYERS,
    RANK,
    Listed,
    cached_folder,
    cached_uri,
    new_slots,
    new_store,
    parse_adapter,
    peft_loader,
    populate,
)

from node.lora.adapter_files import AdapterFiles
from node.lora.provider import AdapterSource, LoadState

RESULTS = Path(__file__).resolve().parent / "results" / "adapters.json"


def time_paired_loads(work: Path, cached: Listed, remote: Listed, num_samples: int,
                      peft_load: Callable[[Path, str], tuple[float, float]],
                      device: torch.device, num_disk: int, is_warm: bool = True) -> dict[str, list[float]]:
    """Seconds per disk -> device load (`get` that misses host memory, then the copy into a slot of
    64, evicting the least recently used), each paired with peft loading the same folder; wall time
    and the calling thread's CPU time (on a shared machine, wall time of a few-ms step also counts
    the other processes' time slices; CPU time does not).

    Pairs alternate which goes first, so that neither always finds the file in the page cache and
    both see the same background load on a shared machine. Also: `get` from a local registry.
    `is_warm`: the store loaded every adapter once before (a node that has served them since it
    started: each entry's parsed config and header and its open weights file are kept), else each
    timed load is the entry's first in this store (the first after a restart). `num_disk`: the disk
    cache's budget in adapters (see `run`).
    """
    slots = new_slots(device)
    out: dict[str, list[float]] = {k: [] for k in ("disk", "device", "disk_to_device", "disk_to_device_cpu",
                                                 "peft", "peft_cpu", "source")}
    with new_store(work, num_host=1, num_disk=num_disk) as store:
        for adapter_id, digest in cached:
            store.register(adapter_id, AdapterSource(cached_uri(work, adapter_id), digest))
        for uri, digest in remote:
            store.register(uri, AdapterSource(uri, digest))
        for adapter_id, _ in cached if is_warm else ():
            store.get(adapter_id)
        for i, (adapter_id, digest) in enumerate(random.Random(1).sample(cached, num_samples)):
            peft_first = bool(i % 2)
            if peft_first:
                _append(out, ("peft", "peft_cpu"), peft_load(cached_folder(work, adapter_id, digest), f"s{i}"))
            started, cpu = time.perf_counter(), time.thread_time()
            weights = store.get(adapter_id)
            loaded = time.perf_counter()
            slots.activate(adapter_id, weights, in_use=())
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            done = time.perf_counter()
            _append(out, ("disk", "device", "disk_to_device", "disk_to_device_cpu"),
                    (loaded - started, done - loaded, done - started, time.thread_time() - cpu))
            if not peft_first:
                _append(out, ("peft", "peft_cpu"), peft_load(cached_folder(work, adapter_id, digest), f"s{i}"))
        for uri, _ in remote:
            started = time.perf_counter()
            store.get(uri)
            out["source"].append(time.perf_counter() - started)
        out["disk_internal"] = list(store.metrics().disk.recent_load_seconds)
    return out


def time_verified_loads(work: Path, cached: Listed, num_samples: int,
                        peft_load: Callable[[Path, str], tuple[float, float]], device: torch.device,
                        num_disk: int) -> dict[str, list[float]]:
    """The same paired disk -> device loads with `verify_every_load` (every load hashes the files
    again: the behaviour before the cache was trusted), for a baseline in the same run."""
    slots = new_slots(device)
    out: dict[str, list[float]] = {"disk_to_device": [], "disk_to_device_cpu": [], "peft": [], "peft_cpu": []}
    with new_store(work, num_host=1, num_disk=num_disk, verify_every_load=True) as store:
        for adapter_id, digest in cached:
            store.register(adapter_id, AdapterSource(cached_uri(work, adapter_id), digest))
        for i, (adapter_id, digest) in enumerate(random.Random(4).sample(cached, num_samples)):
            _append(out, ("peft", "peft_cpu"), peft_load(cached_folder(work, adapter_id, digest), f"v{i}"))
            started, cpu = time.perf_counter(), time.thread_time()
            slots.activate(adapter_id, store.get(adapter_id), in_use=())
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            _append(out, ("disk_to_device", "disk_to_device_cpu"),
                    (time.perf_counter() - started, time.thread_time() - cpu))
    return out


def time_stages(work: Path, cached: Listed, num_samples: int, device: torch.device) -> dict[str, float]:
    """p50 ms of each step of a disk -> device load, run one after the other on this thread: open the
    cached copy (config + safetensors header), header check, the engine's parse (one preadv into the
    stacks), the copy into a slot; and, apart, what `verify_every_load` adds: read the whole file and
    hash it (the registry rule)."""
    slots, steps = new_slots(device), ("open", "header check", "parse", "slot copy", "verify: read + sha256")
    seconds: dict[str, list[float]] = {step: [] for step in steps}
    for adapter_id, digest in random.Random(2).sample(cached, num_samples):
        folder = cached_folder(work, adapter_id, digest)
        marks = [time.perf_counter()]
        files = AdapterFiles.open(folder, is_vetted=True)  # as the store opens a vetted entry
        marks.append(time.perf_counter())
        files.check()
        marks.append(time.perf_counter())
        weights = parse_adapter(files)
        marks.append(time.perf_counter())
        slots.activate(adapter_id, weights, in_use=())
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        marks.append(time.perf_counter())
        assert AdapterFiles.read(folder).sha256().hex() == digest[2:]
        marks.append(time.perf_counter())
        for step, begin, end in zip(steps, marks[:-1], marks[1:], strict=True):
            seconds[step].append(end - begin)
    return {step: _p50(xs) for step, xs in seconds.items()}


def _append(out: dict[str, list[float]], keys: tuple[str, ...], values: tuple[float, ...]) -> None:
    for key, value in zip(keys, values, strict=True):
        out[key].append(value)


def time_http_loads(work: Path, remote: Listed) -> list[float]:
    """Seconds per `get` of an adapter served over HTTP by a local server (a fresh disk cache)."""
    handler = functools.partial(_QuietHandler, directory=str(work / "registry"))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    seconds = []
    try:
        with new_store(work, num_host=1, num_disk=len(remote), cache="cache-http") as store:
            for uri, digest in remote:
                store.register(uri, AdapterSource(f"{url}/{Path(uri).name}", digest))
            for uri, _ in remote:
                started = time.perf_counter()
                store.get(uri)
                seconds.append(time.perf_counter() - started)
    finally:
        server.shutdown()
        server.server_close()
    return seconds


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        return


def run_traffic(work: Path, cached: Listed, num_host: int, num_requests: int,
                alpha: float | None, num_disk: int) -> dict[str, float]:
    """`get` for each request of a Zipf(alpha) (or uniform when None) stream over all adapters."""
    rng = random.Random(3)
    ids = [adapter_id for adapter_id, _ in cached]
    rng.shuffle(ids)  # popularity rank -> adapter, unrelated to disk order
    weights = [1.0 / (k ** alpha) for k in range(1, len(ids) + 1)] if alpha else [1.0] * len(ids)
    requests = rng.choices(ids, weights=weights, k=num_requests)
    hits, misses, is_hit = [], [], []
    with new_store(work, num_host=num_host, num_disk=num_disk) as store:
        for adapter_id, digest in cached:
            store.register(adapter_id, AdapterSource(cached_uri(work, adapter_id), digest))
        for adapter_id in requests:
            is_hit.append(store.state(adapter_id) is LoadState.READY)
            started = time.perf_counter()
            store.get(adapter_id)
            (hits if is_hit[-1] else misses).append(time.perf_counter() - started)
        m = store.metrics()
    steady = is_hit[num_requests // 2:]
    return {"requests": num_requests, "host_hit_rate": m.host.hit_rate or 0.0,
            "steady_host_hit_rate": sum(steady) / len(steady), "disk_hit_rate": m.disk.hit_rate or 0.0,
            "host_evictions": m.host.evictions, "source_fetches": m.source.hits,
            "p50_get_ms": _p50(hits + misses), "p99_get_ms": 1e3 * _p99(hits + misses),
            "p50_hit_ms": _p50(hits) if hits else 0.0, "p50_miss_ms": _p50(misses) if misses else 0.0}


def _p50(xs: list[float]) -> float:
    return 1e3 * statistics.median(xs)


def _p99(xs: list[float]) -> float:
    return sorted(xs)[min(len(xs) - 1, int(0.99 * len(xs)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-adapters", type=int, default=5000)
    parser.add_argument("--num-host", type=int, default=500, help="host cache size, in adapters")
    parser.add_argument("--num-requests", type=int, default=20000)
    parser.add_argument("--num-samples", type=int, default=100, help="timed loads, store and peft each")
    parser.add_argument("--quick", action="store_true", help="600 adapters, host for 60, 3,000 requests")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--section", choices=("all", "store", "engine"), default="all")
    parser.add_argument("--device", default="cpu", help="device of the slots and of peft's model (cpu, cuda)")
    parser.add_argument("--engine-requests", type=int, default=512, help="requests per engine run")
    parser.add_argument("--engine-clients", type=int, default=32, help="closed-loop clients (in flight)")
    parser.add_argument("--engine-rounds", type=int, default=2, help="interleaved rounds, best of each")
    args = parser.parse_args()
    if args.quick:
        args.num_adapters, args.num_host, args.num_requests = 600, 60, 3000
        args.num_samples, args.engine_requests, args.engine_rounds = 30, 192, 1
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)  # 1 MiB copies gain nothing from intra-op threads; peft gets the same
    work = Path(tempfile.mkdtemp(prefix="bench-adapters-"))
    # one section run alone keeps the other section's results already in the JSON
    kept: dict[str, object] = json.loads(args.out.read_text()) if args.section != "all" and args.out.exists() else {}
    report = kept
    try:
        if args.section != "engine":
            report = run(work, args)
            if "engine" in kept:
                report["engine"] = kept["engine"]
            print_table(report)
        if args.section != "store":
            from adapters_engine import print_engine, run_engine  # the engine and its devkit, only when asked

            cached, _ = populate(work / "engine", args.num_adapters, num_registry=0)
            report["engine"] = run_engine(work / "engine", cached, args.num_host, args.engine_requests,
                                          args.engine_clients, args.engine_rounds, args.device)
            print_engine(report["engine"])  # type: ignore[arg-type]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")


def run(work: Path, args: argparse.Namespace) -> dict[str, object]:
    started = time.perf_counter()
    cached, remote = populate(work, args.num_adapters, num_registry=min(50, args.num_samples))
    generate_s = time.perf_counter() - started
    device = torch.device(args.device)
    peft_load = peft_loader(work, work / "registry" / "r0", device)
    # every store below opens the same disk cache, which holds the cached adapters and, once the first
    # run fetched them, the registry's: a budget for fewer evicts some at open (an adapter the next
    # store cannot fetch again: its source is nowhere); the 10 % slack alone covers them only from
    # 500 adapters up
    num_disk = len(cached) + len(remote)
    num_samples = min(args.num_samples, len(cached))
    store = time_paired_loads(work, cached, remote, num_samples, peft_load, device, num_disk)
    first = time_paired_loads(work, cached, [], num_samples, peft_load, device, num_disk, is_warm=False)
    verified = time_verified_loads(work, cached, num_samples, peft_load, device, num_disk)
    http = time_http_loads(work, remote)
    stages = time_stages(work, cached, num_samples, device)
    peft = store["peft"]
    traffic = {name: run_traffic(work, cached, args.num_host, args.num_requests, alpha, num_disk)
               for name, alpha in (("zipf1.1", 1.1), ("uniform", None))}
    loads = {"store_disk_to_host_p50_ms": _p50(store["disk"]),
             "store_disk_to_host_p99_ms": 1e3 * _p99(store["disk"]),
             "store_disk_to_host_worker_p50_ms": _p50(store["disk_internal"]),
             "store_host_to_device_p50_ms": _p50(store["device"]),
             "store_host_to_device_p99_ms": 1e3 * _p99(store["device"]),
             "store_disk_to_device_p50_ms": _p50(store["disk_to_device"]),
             "store_disk_to_device_p99_ms": 1e3 * _p99(store["disk_to_device"]),
             "store_source_to_host_p50_ms": _p50(store["source"]),
             "store_http_to_host_p50_ms": _p50(http),
             "peft_load_adapter_p50_ms": _p50(peft),
             "peft_load_adapter_p99_ms": 1e3 * _p99(peft),
             "store_disk_to_device_cpu_p50_ms": _p50(store["disk_to_device_cpu"]),
             "peft_load_adapter_cpu_p50_ms": _p50(store["peft_cpu"]),
             "stages_p50_ms": stages,
             "verified_disk_to_device_p50_ms": _p50(verified["disk_to_device"]),
             "verified_disk_to_device_cpu_p50_ms": _p50(verified["disk_to_device_cpu"]),
             "verified_peft_cpu_p50_ms": _p50(verified["peft_cpu"]),
             "first_load_disk_to_device_p50_ms": _p50(first["disk_to_device"]),
             "first_load_disk_to_device_cpu_p50_ms": _p50(first["disk_to_device_cpu"]),
             "first_load_peft_p50_ms": _p50(first["peft"]),
             "first_load_peft_cpu_p50_ms": _p50(first["peft_cpu"])}
    loads.update(_ratios(loads))
    loads["peft_over_store_paired_median"] = statistics.median(
        p / d for p, d in zip(peft, store["disk_to_device"], strict=True))
    return {"config": {"num_adapters": args.num_adapters, "num_host": args.num_host,
                       "num_requests": args.num_requests, "num_store_samples": len(store["disk"]),
                       "adapter_bytes": ADAPTER_BYTES, "device": args.device,
                       "model": {"hidden": HIDDEN, "layers": NUM_LAYERS, "heads": NUM_HEADS, "rank": RANK,
                                 "modules": list(MODULES), "dtype": "float32"}},
            "machine": {"python": platform.python_version(), "torch": torch.__version__,
                        "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                        "platform": platform.platform(), "load_average": os.getloadavg(),
                        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
            "generate_seconds": generate_s, "loads": loads, "traffic": traffic}


RATIOS = {  # name: (numerator, denominator), both p50s of `loads`
    "trusted_over_verified_cpu": ("verified_disk_to_device_cpu_p50_ms", "store_disk_to_device_cpu_p50_ms"),
    "peft_over_verified_disk_to_device_cpu": ("verified_peft_cpu_p50_ms", "verified_disk_to_device_cpu_p50_ms"),
    "peft_over_store_disk_to_device_cpu": ("peft_load_adapter_cpu_p50_ms", "store_disk_to_device_cpu_p50_ms"),
    "peft_over_first_load_disk_to_device_cpu": ("first_load_peft_cpu_p50_ms", "first_load_disk_to_device_cpu_p50_ms"),
    "peft_over_first_load_disk_to_device": ("first_load_peft_p50_ms", "first_load_disk_to_device_p50_ms"),
    "peft_over_store_disk_to_device": ("peft_load_adapter_p50_ms", "store_disk_to_device_p50_ms"),
    "peft_over_store_disk_to_host": ("peft_load_adapter_p50_ms", "store_disk_to_host_p50_ms"),
}


def _ratios(loads: dict[str, object]) -> dict[str, float]:
    """peft against the store (and the trusted cache against verifying every load), by their p50s."""
    p50 = {k: v for k, v in loads.items() if isinstance(v, float)}
    return {name: p50[x] / p50[y] for name, (x, y) in RATIOS.items()}


def print_table(report: dict[str, object]) -> None:
    loads: dict[str, float] = report["loads"]  # type: ignore[assignment]
    config: dict[str, object] = report["config"]  # type: ignore[assignment]
    print(f"adapters: {config['num_adapters']} x {config['adapter_bytes'] / 2**20:.2f} MiB, "
          f"host cache for {config['num_host']}")
    print(f"{'load (miss in host memory)':<40}{'p50 ms':>10}{'p99 ms':>10}")
    rows = (("store: disk cache -> device slot", "store_disk_to_device"),
            ("  of which disk cache -> host", "store_disk_to_host"),
            ("  of which host -> device slot", "store_host_to_device"),
            ("store: local source -> disk -> host", "store_source_to_host"),
            ("store: http (127.0.0.1) -> disk -> host", "store_http_to_host"),
            ("peft: PeftModel.load_adapter", "peft_load_adapter"))
    for label, key in rows:
        p99 = loads.get(f"{key}_p99_ms")
        print(f"{label:<40}{loads[f'{key}_p50_ms']:>10.2f}" + (f"{p99:>10.2f}" if p99 is not None else ""))
    print(f"peft / store (disk -> device): {loads['peft_over_store_disk_to_device']:.1f}x on p50s, "
          f"{loads['peft_over_store_paired_median']:.1f}x median of paired ratios "
          f"(disk -> host alone: {loads['peft_over_store_disk_to_host']:.1f}x); on CPU time "
          f"{loads['peft_load_adapter_cpu_p50_ms']:.2f} / {loads['store_disk_to_device_cpu_p50_ms']:.2f} ms = "
          f"{loads['peft_over_store_disk_to_device_cpu']:.1f}x")
    print(f"an entry's first load in the store (after a restart), same run: "
          f"{loads['first_load_disk_to_device_cpu_p50_ms']:.2f} ms CPU disk -> device, peft "
          f"{loads['peft_over_first_load_disk_to_device_cpu']:.1f}x of it on CPU time, "
          f"{loads['peft_over_first_load_disk_to_device']:.1f}x on wall time")
    print(f"verify_every_load (hash every load), same run: {loads['verified_disk_to_device_cpu_p50_ms']:.2f} ms CPU "
          f"disk -> device, peft {loads['peft_over_verified_disk_to_device_cpu']:.1f}x of it; the trusted cache is "
          f"{loads['trusted_over_verified_cpu']:.2f}x faster")
    print("one load step by step, p50 ms: " + ", ".join(f"{k} {v:.3f}" for k, v in loads["stages_p50_ms"].items())
          + "\n")  # type: ignore[attr-defined]
    print(f"{'traffic':<10}{'host hit':>10}{'2nd half':>10}{'disk hit':>10}{'get p50':>10}{'get p99':>10}"
          f"{'hit p50':>10}{'miss p50':>10}   (ms)")
    for name, t in report["traffic"].items():  # type: ignore[attr-defined]
        print(f"{name:<10}{t['host_hit_rate']:>10.3f}{t['steady_host_hit_rate']:>10.3f}"
              f"{t['disk_hit_rate']:>10.3f}{t['p50_get_ms']:>10.3f}{t['p99_get_ms']:>10.3f}"
              f"{t['p50_hit_ms']:>10.4f}{t['p50_miss_ms']:>10.3f}")


if __name__ == "__main__":
    main()
