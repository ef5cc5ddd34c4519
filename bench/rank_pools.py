"""Device slots by rank against one max-rank pool, in the same bytes: adapters resident, copies, tokens/s.

    python bench/rank_pools.py [--requests 512] [--rounds 2] [--device cpu|cuda]

Model: Llama-shaped, hidden 512, 8 layers (the engine benchmark's), float32 on the CPU (bf16 with
--device cuda). 96 adapters on all seven projections with a mix of ranks: 64 of rank 8, 24 of rank
16, 8 of rank 64, held in host memory (so only the device tier differs). Both engines get the bytes
of 24 rank-64 slots: one pool of 24 slots at rank 64, or pools 8:96, 16:24, 64:6 (126 slots).
Requests: 16 prompt + 16 new tokens, greedy, adapters drawn uniformly, all submitted at once, 64
sequences at most per step. Rounds interleave the two configurations; each keeps its best. Prints a
table and writes bench/results/rank_pools.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node.devkit import make_tiny_model
from node.devkit.host_adapters import HostAdapters, random_lora
from node.engine import EngineConfig, LLMEngine, SamplingParams
from node.lora.adapter import LoRATargetSpec, LoRAWeights
from node.lora.slots import LoRASlotPools
from node.models.config import ModelConfig

RANKS = [8] * 64 + [16] * 24 + [64] * 8
MAX_RANK, BUDGET_SLOTS, PROMPT_LEN, NEW_TOKENS = 64, 24, 16, 16
CONFIGS = {"one pool (rank 64)": ((MAX_RANK, BUDGET_SLOTS),), "rank pools": ((8, 96), (16, 24), (64, 6))}
RESULTS = Path(__file__).resolve().parent / "results" / "rank_pools.json"


def run(model: Path, pools: tuple[tuple[int, int], ...], weights: dict[str, LoRAWeights],
        prompts: list[list[int]], adapters: list[str], device: str) -> dict[str, Any]:
    config = EngineConfig(model_path=model, device=device, dtype="float32" if device == "cpu" else "bfloat16",
                          max_num_seqs=64, max_lora_rank=MAX_RANK, adapter_rank_pools=pools,
                          max_model_len=PROMPT_LEN + NEW_TOKENS)
    engine = LLMEngine(config, provider=HostAdapters(weights))  # type: ignore[arg-type]
    pools_of = engine.runner.slots.pools
    engine.generate(prompts[:4], SamplingParams(max_tokens=2, temperature=0), adapters[:4])  # warm-up
    loads_before = sum(pool.num_loads for pool in pools_of)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    started = time.perf_counter()
    outputs = engine.generate(prompts, params, adapters)  # type: ignore[arg-type]
    seconds = time.perf_counter() - started
    slots = engine.runner.slots
    copies = sum(pool.num_loads for pool in pools_of) - loads_before
    return {"tokens_per_s": sum(len(o.token_ids) for o in outputs) / seconds, "seconds": seconds,
            "num_slots": slots.num_slots, "slot_bytes": LoRASlotPools.pools_nbytes(
                engine.lora_target, pools, engine.config.torch_dtype), "slot_copies": copies}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = random.Random(0)
    best: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_model(Path(tmp) / "model", hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=8,
                                vocab_size=8000, initializer_range=0.02)
        cfg = ModelConfig.from_folder(model)
        target = LoRATargetSpec.of(cfg.num_layers, cfg.module_shapes())
        weights = {f"ad-{i}": random_lora(target, rank, i) for i, rank in enumerate(RANKS)}
        prompts = [[rng.randrange(3, 8000) for _ in range(PROMPT_LEN)] for _ in range(args.requests)]
        adapters = [f"ad-{rng.randrange(len(RANKS))}" for _ in range(args.requests)]
        for _ in range(args.rounds):
            for name, pools in CONFIGS.items():
                row = run(model, pools, weights, prompts, adapters, args.device)
                if name not in best or row["tokens_per_s"] > best[name]["tokens_per_s"]:
                    best[name] = {"config": name, "pools": pools, **row}
    rows = list(best.values())
    print(f"{len(RANKS)} adapters (ranks 8 x64, 16 x24, 64 x8), {args.requests} requests, best of {args.rounds}")
    print(f"{'slots':<22}{'pools':<26}{'slots':>6}{'MiB':>8}{'copies':>8}{'tokens/s':>10}")
    for r in rows:
        pools = ",".join(f"{rank}:{num}" for rank, num in r["pools"])
        print(f"{r['config']:<22}{pools:<26}{r['num_slots']:>6}{r['slot_bytes'] / 2**20:>8.1f}"
              f"{r['slot_copies']:>8}{r['tokens_per_s']:>10.1f}")
    ratio = rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]
    print(f"rank pools / one pool: {ratio:.2f}x tokens/s in the same bytes")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"requests": args.requests, "rounds": args.rounds, "device": args.device,
                                   "ranks": {"8": 64, "16": 24, "64": 8}, "rows": rows, "pools_over_one": ratio,
                                   "load_average": os.getloadavg()}, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
