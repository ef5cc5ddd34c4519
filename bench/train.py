"""`loranode adapter train` (node/training) against a plain transformers + peft loop: tokens/s and peak memory.

    python bench/train.py [--rounds 3] [--steps 8] [--threads N] [--sizes-mb 2,16]

Throughput: a Llama-shaped model (hidden 256, 4 layers, 8 heads / 4 KV heads, vocab 512, float32 on the
CPU), a rank-8 LoRA on all seven projections, sequences of 256 tokens, micro-batches of 4, gradient
accumulation 2, AdamW, on the same 1 MB text. The plain loop is what a transformers + peft user writes:
tokenize the text, cut it into blocks, a shuffled DataLoader, `model(input_ids, labels).loss / accum`,
backward, step. Both time each training step (not loading or tokenizing); rounds alternate which
goes first. The headline is the best step's tokens/s over all rounds (least disturbed by other load
on a shared machine); the best whole run's tokens/s is printed beside it, and both per CPU second of
the process (time.process_time: what the step cost, whatever else ran on the machine).

Fair by construction: both sides train the same model, LoRA, sequence length, batch, accumulation and
AdamW (ours fused, the plain one torch's default implementation) on 256-token sequences (ours may draw
the text's shorter last one, right-padded: its pads are computed but not counted), without a KV cache
(`use_cache=False`), and both time the same span (fetching the step's batches, forward, backward,
optimizer step, reading the loss).

Memory: each side in a fresh process, tokenizing from scratch and training 3 steps, on datasets of
the given sizes; peak RSS of the process (ru_maxrss). Prints a table, writes bench/results/train.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from node.devkit import make_tiny_model
from node.devkit.corpus import STYLES, TEXT
from node.training.lora_trainer import StepReport

RESULTS = Path(__file__).resolve().parent / "results" / "train.json"
SEQ_LEN, BATCH, ACCUM, RANK, LR, SEED = 256, 4, 2, 8, 1e-3, 0
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_text(path: Path, num_bytes: int) -> Path:
    corpus = "\n".join([TEXT, *STYLES.values()]) + "\n"
    with open(path, "w", encoding="utf-8") as f:
        written = 0
        while written < num_bytes:
            written += f.write(corpus)
    return path


class StepTimes:
    """Each step's (tokens, seconds, CPU seconds) from the trainer's reports."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, float, float]] = []
        self.last = (0, 0.0, 0.0)

    def on_start(self, plan: object) -> None:
        self.last = (0, 0.0, time.process_time())

    def on_step(self, report: StepReport) -> None:
        cpu = time.process_time()
        self.steps.append((report.num_tokens - self.last[0], report.elapsed_s - self.last[1], cpu - self.last[2]))
        self.last = (report.num_tokens, report.elapsed_s, cpu)


def run_ours(model: Path, data: Path, work: Path, steps: int) -> list[tuple[int, float, float]]:
    """(tokens, seconds, CPU seconds) of each training step of node/training on `data`."""
    from transformers import AutoTokenizer

    from node.lora.content_hash import dataset_content_hash
    from node.training.lora_trainer import LoRATrainer, TrainingConfig
    from node.training.token_file import tokenize_datasets

    tokens = tokenize_datasets(AutoTokenizer.from_pretrained(model), [(data, dataset_content_hash(data))],
                               work / "tokens")
    config = TrainingConfig(rank=RANK, alpha=2 * RANK, lr=LR, target_modules=tuple(TARGETS), seq_len=SEQ_LEN,
                            batch_size=BATCH, grad_accum=ACCUM, max_steps=steps, checkpoint_every=0, seed=SEED)
    times = StepTimes()
    LoRATrainer(model, config, device="cpu").train(tokens, work / "ours", observer=times)
    return times.steps


def run_plain(model: Path, data: Path, work: Path, steps: int) -> list[tuple[int, float, float]]:
    """The same training written the usual transformers + peft way."""
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import DataLoader, TensorDataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(SEED)
    tokenizer = AutoTokenizer.from_pretrained(model)
    ids = tokenizer(data.read_text())["input_ids"]
    num_blocks = len(ids) // SEQ_LEN
    blocks = torch.tensor(ids[:num_blocks * SEQ_LEN]).view(num_blocks, SEQ_LEN)  # [blocks, seq_len]
    loader = DataLoader(TensorDataset(blocks), batch_size=BATCH, shuffle=True,
                        generator=torch.Generator().manual_seed(SEED))
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    base.config.use_cache = False  # as ours: no KV cache is built in training (it would copy K and V per layer)
    peft_model = get_peft_model(base, LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS,
                                                 lora_dropout=0.0, task_type="CAUSAL_LM"))
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=LR)
    peft_model.train()
    batches = iter(loader)
    times = []
    for _ in range(steps):
        started, cpu = time.perf_counter(), time.process_time()
        for _ in range(ACCUM):
            (input_ids,) = next(batches)
            loss = peft_model(input_ids=input_ids, labels=input_ids).loss / ACCUM
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        float(loss)  # what a loop that logs its loss does
        times.append((ACCUM * BATCH * SEQ_LEN, time.perf_counter() - started, time.process_time() - cpu))
    peft_model.save_pretrained(work / "plain")
    return times


def child(side: str, model: Path, data: Path, steps: int) -> None:
    """One measurement in this process: prints tokens, seconds and peak RSS (bytes) as JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        steps_taken = (run_ours if side == "ours" else run_plain)(model, data, Path(tmp), steps)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(json.dumps({"steps": steps_taken, "peak_rss": peak}))


def measure(side: str, model: Path, data: Path, steps: int, threads: int) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", side, "--model", str(model), "--data", str(data),
           "--steps", str(steps), "--threads", str(threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--sizes-mb", default="2,16")
    parser.add_argument("--child", choices=["ours", "plain"])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--data", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        child(args.child, args.model, args.data, args.steps)
        return
    args.load_at_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = make_tiny_model(work / "model", hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4)
        speed = throughput(model, write_text(work / "speed.txt", 1 << 20), args)
        sizes = [float(s) for s in args.sizes_mb.split(",")]
        memory = {size: {side: measure(side, model, write_text(work / f"{size}mb.txt", int(size * (1 << 20))), 3,
                                       args.threads)["peak_rss"] for side in ("ours", "plain")} for size in sizes}
    report(speed, memory, args)


def throughput(model: Path, data: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Per side: the best step's tokens/s and the best whole run's, over all rounds; the same per CPU
    second (what the process itself spent: less moved by other load on a shared machine). Also each
    round's ratio (ours / plain, the two runs of one round being the nearest in time)."""
    keys = ("best_step", "whole_run", "best_step_cpu", "whole_run_cpu")
    best = {side: dict.fromkeys(keys, 0.0) for side in ("ours", "plain")}
    rounds: list[dict[str, float]] = []
    for r in range(args.rounds):
        this_round = {}
        for side in (("ours", "plain") if r % 2 == 0 else ("plain", "ours")):
            steps = measure(side, model, data, args.steps, args.threads)["steps"]
            tokens = sum(t for t, _, _ in steps)
            got = {"best_step": max(t / s for t, s, _ in steps), "whole_run": tokens / sum(s for _, s, _ in steps),
                   "best_step_cpu": max(t / c for t, _, c in steps),
                   "whole_run_cpu": tokens / sum(c for *_, c in steps)}
            for key in keys:
                best[side][key] = max(best[side][key], got[key])
            this_round[side] = got
            print(f"round {r + 1} {side:5s} best step {got['best_step']:8,.0f} tok/s, whole run "
                  f"{got['whole_run']:8,.0f} tok/s (per CPU s: {got['best_step_cpu']:8,.0f} and "
                  f"{got['whole_run_cpu']:8,.0f})", flush=True)
        rounds.append({key: this_round["ours"][key] / this_round["plain"][key] for key in keys})
    return {**best, "rounds": rounds}


def report(speed: dict[str, Any], memory: dict[float, dict[str, float]], args: argparse.Namespace) -> None:
    ratios = {k: speed["ours"][k] / speed["plain"][k] for k in speed["ours"]}
    round_ratios = {k: [r[k] for r in speed["rounds"]] for k in ratios}
    print(f"\n{'':28s}{'node/training':>16s}{'plain loop':>16s}{'ratio':>10s}")
    for key, label in (("best_step", "tokens/s, best step"), ("whole_run", "tokens/s, best whole run"),
                       ("best_step_cpu", "tokens/CPU s, best step"), ("whole_run_cpu", "tokens/CPU s, whole run")):
        print(f"{label:28s}{speed['ours'][key]:16,.0f}{speed['plain'][key]:16,.0f}{ratios[key]:9.2f}x"
              f"   rounds: {' '.join(f'{x:.2f}' for x in round_ratios[key])}, median {median(round_ratios[key]):.2f}x")
    for size, peaks in memory.items():
        label = f"peak RSS, {size:g} MB dataset"
        print(f"{label:28s}{peaks['ours'] / 2**20:13,.0f} MB{peaks['plain'] / 2**20:13,.0f} MB")
    sizes = sorted(memory)
    growth = {side: memory[sizes[-1]][side] / memory[sizes[0]][side] for side in ("ours", "plain")}
    print(f"{f'peak growth {sizes[0]:g} -> {sizes[-1]:g} MB':28s}{growth['ours']:15.2f}x{growth['plain']:15.2f}x")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "command": "python bench/train.py " + " ".join(sys.argv[1:]),
        "load_average": {"start": args.load_at_start, "end": os.getloadavg()},
        "threads": args.threads, "rounds": args.rounds,
        "steps": args.steps, "seq_len": SEQ_LEN, "batch_size": BATCH, "grad_accum": ACCUM, "rank": RANK,
        "tokens_per_s": {side: speed[side] for side in ("ours", "plain")}, "ratio": ratios,
        "round_ratios": round_ratios, "median_round_ratio": {k: median(v) for k, v in round_ratios.items()},
        "peak_rss_bytes": {f"{size:g}MB": peaks for size, peaks in memory.items()}, "peak_growth": growth,
    }, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
