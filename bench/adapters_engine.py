"""The engine section of bench/adapters.py: LLMEngine over the tiered store against all-resident.

Model: the engine benchmark's shape (Llama, hidden 512, 8 layers, 8 heads MHA, vocab 8,000, random
weights, float32, CPU). Adapters: the ones bench/adapters.py wrote into the disk cache (rank 8 on
q, k, v, o, 1 MiB each). 64 device slots, host cache for `num_host` adapters.

Traffic is closed-loop: `num_clients` clients each send a request (random prompt of PROMPT_LEN
tokens, NEW_TOKENS greedy tokens) and the next one as soon as theirs finishes, adapters drawn Zipf(1.1)
or uniform over all adapters. Per distribution, two runs of the same requests:
- tiered: a fresh store whose host memory starts empty; every adapter is only in the disk cache;
- all-resident: a store whose host memory holds every adapter the requests use, all loaded before
  the clock starts (device slots are still 64 in both: host->device copies happen in both runs).
Reported: tokens/s and its ratio to all-resident, p50/p99 time to first token (from the request's
submission), the tier each request's adapter was in when it was submitted (device slot, host,
loading, disk), p50 disk->host (store worker: hash check + parse) and host->device (slot copy).
"""

from __future__ import annotations

import functools
import os
import random
import statistics
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from node.devkit import make_tiny_model
from node.engine import EngineConfig, LLMEngine, SamplingParams
from node.engine.sequence import StreamDelta
from node.lora.adapter import LoRATargetSpec, LoRAWeights, load_lora_adapter
from node.lora.provider import AdapterSource, LoadState
from node.lora.store import AdapterStore, StoreConfig
from node.models.config import ModelConfig

PROMPT_LEN, NEW_TOKENS, NUM_SLOTS, RANK, VOCAB = 16, 8, 64, 8, 8000
Listed = list[tuple[str, str]]  # (adapter id, registered hash)


@dataclass
class _Run:
    """Closed-loop clients over one engine; every field is touched on the engine thread only."""

    engine: LLMEngine
    store: AdapterStore[LoRAWeights]
    queue: list[tuple[list[int], str]]
    submitted: dict[str, float] = field(default_factory=dict)
    ttft: list[float] = field(default_factory=list)
    tiers: Counter[str] = field(default_factory=Counter)
    num_tokens: int = 0
    num_done: int = 0
    slot_writes: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    ends: list[tuple[float, int]] = field(default_factory=list)  # (finished at, completion tokens)
    finished: threading.Event = field(default_factory=threading.Event)

    def submit(self) -> None:
        if not self.queue:
            return
        prompt, adapter = self.queue.pop()
        self.tiers[self._tier(adapter)] += 1
        rid = f"r{len(self.submitted)}"
        self.submitted[rid] = time.perf_counter()
        params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
        self.engine.add_request(prompt, params, adapter, request_id=rid, listener=self.on_delta)

    def _tier(self, adapter: str) -> str:
        if adapter in self.engine.runner.slots.slot_of:
            return "device"
        return {LoadState.READY: "host", LoadState.LOADING: "loading"}.get(self.store.state(adapter), "disk")

    def on_delta(self, delta: StreamDelta) -> None:
        if delta.token_ids and delta.num_completion_tokens == len(delta.token_ids):
            self.ttft.append(time.perf_counter() - self.submitted[delta.request_id])
        if delta.finish_reason is not None:
            self.num_tokens += delta.num_completion_tokens
            self.ends.append((time.perf_counter(), delta.num_completion_tokens))
            self.num_done += 1
            if delta.finish_reason != "length":
                self.errors.append(f"{delta.request_id}: {delta.finish_reason} {delta.error}")
            if self.queue:
                self.submit()
            elif self.num_done == len(self.submitted):
                self.finished.set()


def _timed_slot_writes(engine: LLMEngine, sink: list[float]) -> None:
    """Record the seconds of every host->device copy into a slot (the bench's own instrumentation)."""
    is_cuda = engine.runner.slots.device.type == "cuda"
    for pool in engine.runner.slots.pools:
        def timed(slot: int, weights: LoRAWeights, write: Any = pool._write) -> None:
            started = time.perf_counter()
            write(slot, weights)
            if is_cuda:
                torch.cuda.synchronize()
            sink.append(time.perf_counter() - started)

        pool._write = timed  # type: ignore[method-assign]


def _store(work: Path, cached: Listed, host_bytes: int) -> AdapterStore[LoRAWeights]:
    model = ModelConfig.from_folder(work / "model")
    target = LoRATargetSpec.of(model.num_layers, model.module_shapes())
    parse = functools.partial(load_lora_adapter, target=target, max_rank=RANK)
    config = StoreConfig(cache_dir=work / "cache", max_host_bytes=host_bytes,
                         max_disk_bytes=int(len(cached) * (1 << 20) * 1.1))
    store = AdapterStore(config, parse, lambda w: w.nbytes)
    for adapter_id, digest in cached:
        store.register(adapter_id, AdapterSource(str(work / "nowhere" / adapter_id), digest))
    return store


def _run(work: Path, cached: Listed, requests: list[tuple[list[int], str]], host_bytes: int,
         num_clients: int, resident: bool, device: str) -> dict[str, object]:
    with _store(work, cached, host_bytes) as store:
        if resident:
            for adapter in {a for _, a in requests}:
                store.get(adapter)
        config = EngineConfig(model_path=work / "model", device=device, max_num_seqs=num_clients,
                              max_adapter_slots=NUM_SLOTS,
                              max_lora_rank=RANK, max_model_len=PROMPT_LEN + NEW_TOKENS + 8,
                              max_num_batched_tokens=num_clients * PROMPT_LEN)
        engine = LLMEngine(config, provider=store)
        engine.generate([requests[0][0]] * 2, SamplingParams(max_tokens=2, temperature=0))  # warm-up, no adapter
        run = _Run(engine, store, list(reversed(requests)))
        _timed_slot_writes(engine, run.slot_writes)
        started = time.perf_counter()
        for _ in range(num_clients):
            run.submit()
        engine.start()
        try:
            run.finished.wait()
        finally:
            engine.shutdown()
        seconds = time.perf_counter() - started
        m = store.metrics()
    if run.errors:
        raise RuntimeError(f"{len(run.errors)} requests failed, first: {run.errors[0]}")
    disk_p50 = m.disk.p50_load_seconds
    write_p50 = statistics.median(run.slot_writes) if run.slot_writes else None
    half = run.ends[len(run.ends) // 2:]  # steady state: the second half of the requests to finish
    return {"seconds": seconds, "tokens_per_s": run.num_tokens / seconds,
            "second_half_tokens_per_s": sum(n for _, n in half[1:]) / (half[-1][0] - half[0][0]),
            "ttft_p50_ms": 1e3 * statistics.median(run.ttft), "ttft_p99_ms": 1e3 * _p99(run.ttft),
            "tier_at_submit": {k: run.tiers[k] / len(requests) for k in ("device", "host", "loading", "disk")},
            "disk_loads": m.disk.num_loads, "host_evictions": m.host.evictions,
            "slot_writes": len(run.slot_writes),
            "disk_to_host_p50_ms": 1e3 * disk_p50 if disk_p50 is not None else None,
            "host_to_device_p50_ms": 1e3 * write_p50 if write_p50 is not None else None,
            "disk_to_device_p50_ms": (1e3 * (disk_p50 + write_p50)
                                      if disk_p50 is not None and write_p50 is not None else None)}


def _rate(run: dict[str, object]) -> float:
    return run["tokens_per_s"]  # type: ignore[return-value]


def _p99(xs: list[float]) -> float:
    return sorted(xs)[min(len(xs) - 1, int(0.99 * len(xs)))]


def _requests(ids: list[str], num_requests: int, alpha: float | None, seed: int) -> list[tuple[list[int], str]]:
    rng = random.Random(seed)
    order = list(ids)
    rng.shuffle(order)  # popularity rank -> adapter, unrelated to disk order
    weights = [1.0 / k ** alpha for k in range(1, len(order) + 1)] if alpha else [1.0] * len(order)
    adapters = rng.choices(order, weights=weights, k=num_requests)
    return [([rng.randrange(3, VOCAB) for _ in range(PROMPT_LEN)], a) for a in adapters]


def run_engine(work: Path, cached: Listed, num_host: int, num_requests: int,
               num_clients: int, rounds: int = 1, device: str = "cpu") -> dict[str, object]:
    """Both distributions, tiered then all-resident each (`rounds` times, best of each); the ratios
    are within this one run."""
    make_tiny_model(work / "model", hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=8,
                    vocab_size=VOCAB, initializer_range=0.02)
    ids = [adapter_id for adapter_id, _ in cached]
    host_bytes = int(num_host * (1 << 20) * 1.02)
    out: dict[str, object] = {"config": {"num_adapters": len(ids), "num_host": num_host, "num_slots": NUM_SLOTS,
                                         "num_requests": num_requests, "num_clients": num_clients, "rounds": rounds,
                                         "load_average_at_start": os.getloadavg(), "device": device,
                                         "prompt_len": PROMPT_LEN, "new_tokens": NEW_TOKENS, "rank": RANK,
                                         "model": "llama hidden 512, 8 layers, 8 heads, vocab 8000, f32"}}
    for name, alpha in (("zipf1.1", 1.1), ("uniform", None)):
        requests = _requests(ids, num_requests, alpha, seed=7)
        distinct = len({a for _, a in requests})
        tiered_runs, resident_runs = [], []
        for _ in range(rounds):  # interleaved, best of each: other load on a shared machine hits both alike
            tiered_runs.append(_run(work, cached, requests, host_bytes, num_clients, False, device))
            resident_runs.append(_run(work, cached, requests, int(distinct * (1 << 20) * 1.1), num_clients,
                                      True, device))
        tiered, resident = max(tiered_runs, key=_rate), max(resident_runs, key=_rate)
        out[name] = {"distinct_adapters": distinct, "tiered": tiered, "all_resident": resident,
                     "throughput_vs_all_resident": tiered["tokens_per_s"] / resident["tokens_per_s"],
                     "second_half_vs_all_resident": (tiered["second_half_tokens_per_s"]
                                                     / resident["second_half_tokens_per_s"])}
    return out


def print_engine(report: dict[str, object]) -> None:
    c: dict[str, object] = report["config"]  # type: ignore[assignment]
    print(f"\nengine: {c['num_adapters']} adapters on disk, host for {c['num_host']}, {c['num_slots']} slots, "
          f"{c['num_requests']} requests x {c['new_tokens']} tokens, {c['num_clients']} clients")
    print(f"{'traffic':<9}{'run':<13}{'tok/s':>7}{'ratio':>6}{'2nd half':>9}{'ratio':>6}{'ttft p50':>9}{'p99':>6}"
          f"{'device':>8}{'host':>7}{'loading':>8}{'disk':>7}{'disk>host':>10}{'host>dev':>9}  (ms)")
    for name in ("zipf1.1", "uniform"):
        d: dict[str, object] = report[name]  # type: ignore[assignment]
        for run in ("tiered", "all_resident"):
            r: dict[str, object] = d[run]  # type: ignore[assignment]
            t: dict[str, float] = r["tier_at_submit"]  # type: ignore[assignment]
            ratio = f"{d['throughput_vs_all_resident']:.2f}" if run == "tiered" else "1.00"
            ratio2 = f"{d['second_half_vs_all_resident']:.2f}" if run == "tiered" else "1.00"
            print(f"{name:<9}{run:<13}{r['tokens_per_s']:>7.1f}{ratio:>6}{r['second_half_tokens_per_s']:>9.1f}"
                  f"{ratio2:>6}{r['ttft_p50_ms']:>9.0f}{r['ttft_p99_ms']:>6.0f}{t['device']:>8.2f}{t['host']:>7.2f}{t['loading']:>8.2f}"
                  f"{t['disk']:>7.2f}{_ms(r['disk_to_host_p50_ms']):>10}{_ms(r['host_to_device_p50_ms']):>9}")


def _ms(value: object) -> str:
    return f"{value:.2f}" if isinstance(value, float) else "-"
