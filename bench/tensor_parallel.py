"""Tensor parallelism on this machine: what each decode step communicates, and what it costs in time.

    python bench/tensor_parallel.py [--batch 8] [--steps 12] [--rounds 3]

Model: Llama-shaped, hidden 512, 8 layers, 8 query heads, 2 KV heads, intermediate 1408, vocab 2048,
float32, on the CPU with gloo. Adapters: 4 synthetic ones on all seven projections (ranks 8 and 16),
held in host memory. A decode batch of `--batch` sequences (16-token prompts), every sequence with
an adapter (the "LoRA" batch) or none (the "base" batch).

Measured (the group counts every collective's payload): the all-reduce bytes per decode step per
layer, against the Megatron minimum (two all-reduces of [batch, hidden] per layer: after o and after
down); what else a step moves (the embedding's all-reduce, the logits gathered on rank 0, the
sampled ids broadcast, the pickled step inputs); and the collectives LoRA adds (LoRA batch minus base
batch). Time: the best decode step of TP=2 (2 processes, 1 torch thread each) against TP=1 (1
process, 2 threads), rounds interleaved. This machine has 2 cores: both configurations get the same
2 cores and the same memory bandwidth, so TP=2 cannot be faster here; the ratio is the price of the
split itself (collectives over loopback TCP, the step inputs' pickling, one process waiting on the
other), which a multi-GPU machine pays over NVLink instead. Writes bench/results/tensor_parallel.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node.devkit import make_tiny_model
from node.devkit.host_adapters import HostAdapters, random_lora
from node.engine import EngineConfig, LLMEngine, SamplingParams
from node.lora.adapter import LoRATargetSpec
from node.models.config import ModelConfig

SHAPE = dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=2, intermediate_size=1408, vocab_size=2048)
ADAPTERS = {"a-r8": 8, "b-r8": 8, "c-r16": 16, "d-r16": 16}
PROMPT_LEN = 16
# (tensor_parallel_size, torch threads of this process): TP=2's worker gets 1 thread (2 cores / 2 ranks)
RUNS = {"TP=1, 2 threads": (1, 2), "TP=1, 1 thread": (1, 1), "TP=2, 1 thread per rank": (2, 1)}
RESULTS = Path(__file__).resolve().parent / "results" / "tensor_parallel.json"


def decode_steps(engine: LLMEngine, batch: int, steps: int, adapters: list[str | None], tag: str,
                 ) -> tuple[list[float], list[tuple[Counter[str], Counter[str]]], float]:
    """Seconds of each decode step after one prefill step, the collectives (calls, bytes) of each, and
    the CPU seconds per decode step of every rank together."""
    params = SamplingParams(max_tokens=steps + 1, temperature=0, ignore_eos=True)
    for i in range(batch):
        engine.add_request([5 + (i + j) % 200 for j in range(PROMPT_LEN)], params, adapters[i % len(adapters)],
                           request_id=f"{tag}-{i}")
    engine.step()  # every prompt in one prefill step (and its first token)
    group = getattr(engine.runner, "group", None)
    times, comms = [], []
    cpu_started = cpu_seconds(group)
    while engine.has_unfinished():
        calls, nbytes = (Counter(group.calls), Counter(group.bytes)) if group else (Counter(), Counter())
        started = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - started)
        if group:
            comms.append((group.calls - calls, group.bytes - nbytes))
    return times, comms, (cpu_seconds(group) - cpu_started) / len(times)


def cpu_seconds(group: Any) -> float:
    """CPU seconds used so far by this process and the group's worker processes (all their threads)."""
    ticks = os.sysconf("SC_CLK_TCK")
    workers = 0.0
    for proc in getattr(group, "procs", []):
        fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        workers += (int(fields[11]) + int(fields[12])) / ticks  # utime + stime
    return time.process_time() + workers


def per_step(comms: list[tuple[Counter[str], Counter[str]]]) -> dict[str, dict[str, float]]:
    """Mean calls and bytes per decode step, by collective."""
    kinds = sorted({k for calls, _ in comms for k in calls})
    return {k: {"calls": statistics.mean(c[k] for c, _ in comms), "bytes": statistics.mean(b[k] for _, b in comms)}
            for k in kinds}


# The GPU model's assumptions (a model, not a measurement): the TP=1 step times are bench/gpu.py's, measured
# on one H200 (bench/results/gpu.json: Llama-3-8B shape, bf16, 32 layers, hidden 4096, vocab 128256);
# NVLink 4 moves 450 GB/s per direction per GPU (900 GB/s both ways, as published for H100/H200 SXM);
# each all-reduce or gather also pays a fixed latency; the base work splits evenly over the ranks, and
# LoRA's (the step time above the base's) half splits, half is duplicated (shrinks of column-parallel
# and expands of row-parallel projections run on every rank).
GPU_MODEL = dict(hidden=4096, layers=32, vocab=128256, elem_bytes=2, nvlink_bytes_per_s=450e9, latency_s=10e-6)


def gpu_model(gpu_json: Path) -> list[dict[str, Any]]:
    """Modelled decode step time at TP = 2, 4, 8 from the measured TP=1 rows of bench/gpu.py."""
    m = GPU_MODEL
    rows = [r for r in json.loads(gpu_json.read_text())["rows"] if not r["int8"]]
    base = {r["batch"]: r["step_ms"] / 1e3 for r in rows if r["adapters"] == 0}
    out = []
    for r in rows:
        batch, step = r["batch"], r["step_ms"] / 1e3
        lora = step - base[batch]
        for p in (2, 4, 8):
            ring = 2 * (p - 1) / p * batch * m["hidden"] * m["elem_bytes"] / m["nvlink_bytes_per_s"]
            all_reduces = (2 * m["layers"] + 1) * (m["latency_s"] + ring)  # o and down per layer, the embedding
            gather = m["latency_s"] + (p - 1) * batch * m["vocab"] / p * 4 / m["nvlink_bytes_per_s"]
            compute = base[batch] / p + lora * (0.5 + 0.5 / p)
            total = compute + all_reduces + gather
            out.append({"batch": batch, "adapters": r["adapters"], "tp": p, "tp1_measured_ms": step * 1e3,
                        "compute_ms": compute * 1e3, "communication_ms": (all_reduces + gather) * 1e3,
                        "step_ms": total * 1e3, "speedup_vs_tp1": step / total})
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    load_before = os.getloadavg()
    folder = make_tiny_model(Path(tempfile.mkdtemp()) / "model", **SHAPE)  # type: ignore[arg-type]
    cfg = ModelConfig.from_folder(folder)
    target = LoRATargetSpec.of(cfg.num_layers, cfg.module_shapes())
    weights = {name: random_lora(target, rank, seed) for seed, (name, rank) in enumerate(ADAPTERS.items())}
    engines = {}
    for size in (1, 2):
        config = EngineConfig(model_path=folder, max_num_seqs=args.batch, max_lora_rank=16, max_adapter_slots=4,
                              max_model_len=128, tensor_parallel_size=size)
        engines[size] = LLMEngine(config, provider=HostAdapters(weights))  # type: ignore[arg-type]
    with_lora: list[str | None] = list(ADAPTERS)
    best = dict.fromkeys(RUNS, float("inf"))
    cpu_best = dict.fromkeys(RUNS, float("inf"))
    medians: dict[str, list[float]] = {run: [] for run in RUNS}
    comms: dict[str, list[tuple[Counter[str], Counter[str]]]] = {"lora": [], "base": []}
    engines[2].runner.group.is_counting_object_bytes = True  # type: ignore[attr-defined]
    for r in range(args.rounds):
        for run, (size, threads) in RUNS.items():
            torch.set_num_threads(threads)
            times, counted, cpu = decode_steps(engines[size], args.batch, args.steps, with_lora, f"{run}-{r}")
            best[run] = min(best[run], min(times))
            cpu_best[run] = min(cpu_best[run], cpu)
            medians[run].append(statistics.median(times))
            comms["lora"] += counted
        _, counted, _ = decode_steps(engines[2], args.batch, 2, [None], f"base-{r}")
        comms["base"] += counted
    report(cfg, args.batch, {"wall": best, "cpu": cpu_best}, medians, {k: per_step(v) for k, v in comms.items()},
           gpu_model(RESULTS.parent / "gpu.json"), (load_before, os.getloadavg()))
    engines[2].shutdown()


def report(cfg: ModelConfig, batch: int, times: dict[str, dict[str, float]], medians: dict[str, list[float]],
           comms: dict[str, dict[str, dict[str, float]]], modelled: list[dict[str, Any]],
           load: tuple[tuple[float, ...], tuple[float, ...]]) -> None:
    lora, base = comms["lora"], comms["base"]
    per_layer = (lora["all_reduce"]["bytes"] - batch * cfg.hidden_size * 4) / cfg.num_layers  # less the embedding's
    megatron = 2 * batch * cfg.hidden_size * 4
    extra = {k: {"calls": lora[k]["calls"] - base.get(k, {"calls": 0})["calls"],
                 "bytes": lora[k]["bytes"] - base.get(k, {"bytes": 0})["bytes"]} for k in lora
             if k != "broadcast_object"}
    best, cpu, tp1 = times["wall"], times["cpu"], "TP=1, 1 thread"
    result: dict[str, Any] = {
        "load_average_1_5_15_min": {"before": load[0], "after": load[1]}, "cpu_count": os.cpu_count(),
        "model": {**SHAPE, "dtype": "float32"}, "batch": batch, "tensor_parallel_size": 2, "device": "cpu (gloo)",
        "all_reduce_bytes_per_layer": per_layer, "megatron_min_bytes_per_layer": megatron,
        "ratio_to_megatron": per_layer / megatron,
        "ring_wire_bytes_per_rank_per_layer": per_layer * 2 * (2 - 1) / 2,
        "collectives_per_step_lora_batch": lora, "collectives_per_step_base_batch": base,
        "extra_from_lora": extra,
        "decode_step_best_wall_s": best, "decode_step_best_median_wall_s": {k: min(v) for k, v in medians.items()},
        "decode_step_best_cpu_s_all_ranks": cpu,
        "wall_vs_tp1_1thread": {k: v / best[tp1] for k, v in best.items()},
        "cpu_vs_tp1_1thread": {k: v / cpu[tp1] for k, v in cpu.items()},
        "gpu_model": {"label": "MODEL, not a measurement: TP=1 measured on one H200 (bench/results/gpu.json), "
                               "NVLink bandwidth as published, latency assumed", "assumptions": GPU_MODEL,
                      "rows": modelled},
    }
    print(f"decode batch {batch}, model hidden {cfg.hidden_size} x {cfg.num_layers} layers, TP=2 on gloo (CPU); "
          f"load average {load[0][0]:.1f} before, {load[1][0]:.1f} after, on {os.cpu_count()} cores")
    print(f"{'per decode step (LoRA batch)':44} {'calls':>7} {'bytes':>10}")
    for kind, v in lora.items():
        print(f"  {kind:42} {v['calls']:7.1f} {v['bytes']:10.0f}")
    print(f"all-reduce bytes per layer (measured)         {per_layer:10.0f}")
    print(f"Megatron minimum per layer (2 x [B, hidden])  {megatron:10.0f}  ratio {per_layer / megatron:.2f}")
    print("extra collectives from LoRA (LoRA - base)    "
          + ", ".join(f"{k}: {v['calls']:+.0f} calls {v['bytes']:+.0f} B" for k, v in extra.items()))
    print(f"{'decode step':26} {'best wall ms':>12} {'vs TP=1/1t':>10} {'CPU ms (all ranks)':>19} {'vs TP=1/1t':>10}")
    for run in best:
        print(f"{run:26} {best[run] * 1e3:12.2f} {best[run] / best[tp1]:9.2f}x {cpu[run] * 1e3:19.2f} "
              f"{cpu[run] / cpu[tp1]:9.2f}x")
    print("GPU MODEL (not measured): Llama-3-8B shape, bf16; TP=1 as measured on one H200 by bench/gpu.py")
    print(f"{'batch':>6} {'adapters':>8} {'TP':>3} {'TP=1 ms':>8} {'compute':>8} {'comm':>7} {'step ms':>8} "
          f"{'speed-up':>9}")
    for row in modelled:
        print(f"{row['batch']:6} {row['adapters']:8} {row['tp']:3} {row['tp1_measured_ms']:8.2f} "
              f"{row['compute_ms']:8.2f} {row['communication_ms']:7.2f} {row['step_ms']:8.2f} "
              f"{row['speedup_vs_tp1']:8.2f}x")
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
