"""The cost model's measured inputs (node/cost.py), then `loranode cost` for named GPUs with them:
- from the GPU bench (bench/results/gpu.json, `bench/gpu.py` on a lent GPU), when it is there: the
  fraction of the GPU's datasheet bandwidth a base-model step reaches (batch 64) and the multi-adapter
  overhead per byte (the base step's bytes/s over the bytes/s of the step with 64 distinct adapters);
- else from this machine's CPU: bandwidth efficiency 1 (the datasheet's), and the overhead as the
  time of a step over NUM_ADAPTERS adapters over the same batch on the base model (a CPU figure:
  LoRA compute weighs far more here than on a GPU, where decoding is bound by memory).
The CPU measurement always runs and is kept in the JSON beside whichever figures the model uses.

Model: Llama, hidden 256, 4 layers, 4 heads, float32 on the CPU. A batch
of BATCH sequences, NEW_TOKENS greedy tokens each; base: no adapter; multi: NUM_ADAPTERS rank-16
adapters on q, k, v, o, spread over the batch (every step applies all of them). Rounds interleave
base and multi; the best of each counts. Writes bench/results/cost.json.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from node.cli import app
from node.cost import GPUS
from node.devkit import make_tiny_model
from node.engine import EngineConfig, LLMEngine, SamplingParams

HIDDEN, LAYERS, HEADS, RANK, MODULES = 256, 4, 4, 16, ("q_proj", "k_proj", "v_proj", "o_proj")
BATCH, NEW_TOKENS, NUM_ADAPTERS, ROUNDS = 8, 16, 8, 5
RESULTS = Path(__file__).resolve().parent / "results" / "cost.json"
GPU_RESULTS = Path(__file__).resolve().parent / "results" / "gpu.json"


def gpu_figures(path: Path) -> dict[str, object] | None:
    """Bandwidth efficiency and per-byte adapter overhead from the GPU bench's batch-64 rows."""
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    rows = {r["adapters"]: r for r in data["rows"] if r["batch"] == 64 and not r["int8"]}
    if 0 not in rows or 64 not in rows:
        return None
    datasheet = next(g.bandwidth_bytes_s for k, g in GPUS.items() if k in str(data["device"]).lower())
    base, many = rows[0]["achieved_bytes_per_s"], rows[64]["achieved_bytes_per_s"]
    return {"bandwidth_efficiency": base / datasheet, "adapter_overhead": base / many,
            "source": f"bench/gpu.py on {data['device']}: batch 64, 0 vs 64 adapters of rank {data['rank']}"}


def write_adapter(folder: Path, seed: int) -> Path:
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(LAYERS):
        for module in MODULES:
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(RANK, HIDDEN, generator=gen) * 0.01
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(HIDDEN, RANK, generator=gen) * 0.01
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": 2 * RANK,
         "target_modules": list(MODULES), "base_model_name_or_path": "bench"}))
    return folder


def _timed(engine: LLMEngine, adapters: list[str | None]) -> float:
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    started = time.perf_counter()
    engine.generate([[5, 6, 7, 8, 9, 10, 11, 12]] * BATCH, params, adapters)
    return time.perf_counter() - started


def measure(root: Path) -> dict[str, float]:
    model = make_tiny_model(root / "model", hidden_size=HIDDEN, num_layers=LAYERS, num_heads=HEADS,
                            num_kv_heads=HEADS, vocab_size=4096)
    engine = LLMEngine(EngineConfig(model_path=model, max_num_seqs=BATCH, max_model_len=128,
                                    max_adapter_slots=NUM_ADAPTERS, max_lora_rank=RANK))
    for i in range(NUM_ADAPTERS):
        engine.add_adapter(f"a{i}", write_adapter(root / f"a{i}", seed=i))
    multi: list[str | None] = [f"a{i % NUM_ADAPTERS}" for i in range(BATCH)]
    base: list[str | None] = [None] * BATCH
    _timed(engine, base), _timed(engine, multi)  # warm up
    times: dict[str, list[float]] = {"base": [], "multi": []}
    for _ in range(ROUNDS):
        times["base"].append(_timed(engine, base))
        times["multi"].append(_timed(engine, multi))
    best = {k: min(v) for k, v in times.items()}
    return {"base_s": best["base"], "multi_s": best["multi"], "multi_adapter_overhead": best["multi"] / best["base"]}


def main() -> None:
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        figures = measure(Path(tmp))
    cpu = {**figures, "measured_on": f"{platform.machine()} CPU, torch {torch.__version__}, "
                                    f"{torch.get_num_threads()} threads",
           "load_average": {"before": load_before[0], "after": os.getloadavg()[0]},
           "batch": BATCH, "new_tokens": NEW_TOKENS, "num_adapters": NUM_ADAPTERS, "rank": RANK}
    used = gpu_figures(GPU_RESULTS) or {
        "bandwidth_efficiency": 1.0, "adapter_overhead": figures["multi_adapter_overhead"],
        "source": f"bench/cost.py on this machine's CPU ({cpu['measured_on']})"}
    result = {**used, "cpu": cpu}
    print(f"{'case':<8}{'best s':>10}")
    print(f"{'base':<8}{figures['base_s']:>10.3f}\n{'multi':<8}{figures['multi_s']:>10.3f}")
    print(f"CPU multi-adapter overhead: x{figures['multi_adapter_overhead']:.3f} "
          f"({NUM_ADAPTERS} adapters, batch {BATCH}; load average {cpu['load_average']})")
    print(f"the cost model uses: {used['source']}")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    for gpu in ("h100", "h200"):
        out = CliRunner().invoke(app, ["cost", "--gpu", gpu, "--adapters", "100", "--concurrency", "64",
                                       "--measured", str(RESULTS)])
        print(out.output)


if __name__ == "__main__":
    main()
