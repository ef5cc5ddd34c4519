"""Quantized bases: decode tokens/s, weight bytes and accuracy of int8 and int4 against the unquantized
model, in one run.

    python bench/quant.py                 # CPU: fp32 against int8 and int4, batch 1 and 16
    python bench/quant.py --device cuda --dtype bfloat16 --schemes int8,int4,fp8 --batches 1,16,64

Model: the engine benchmark's (Llama-shaped, hidden 512, 8 layers, 8 heads, vocab 8,000, random
weights). Speed: `--batches` requests of 64 prompt tokens decoding `--new-tokens` greedy tokens each,
the schemes interleaved over `--rounds` rounds, best of each. Accuracy (node/models/quant_accuracy.py):
the next-token logits after 64 fixed prompts, KL against the reference and top-1 agreement, over all
and where the reference leads its second choice by more than 0.1 / 0.25 logits (a random model's
top logits are near ties: agreement over all counts ties). Prints a table and writes
bench/results/quant.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node.devkit import make_tiny_model
from node.engine import EngineConfig, LLMEngine, SamplingParams
from node.engine.sequence import Sequence
from node.models.quant import QUANTIZED, tensor_nbytes, weight_nbytes
from node.models.quant_accuracy import Agreement

PROMPT_LEN, VOCAB, MARGINS = 64, 8000, (0.1, 0.25)
RESULTS = Path(__file__).resolve().parent / "results" / "quant.json"


def new_engine(model: Path, scheme: str, args: argparse.Namespace) -> LLMEngine:
    return LLMEngine(EngineConfig(model_path=model, device=args.device, dtype=args.dtype, max_num_seqs=256,
                                  max_model_len=PROMPT_LEN + args.new_tokens, weight_quantization=scheme))


def decode_rate(engine: LLMEngine, batch: int, new_tokens: int) -> float:
    """Generated tokens per second for `batch` requests decoding together (prefill included)."""
    rng = random.Random(batch)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(PROMPT_LEN)] for _ in range(batch)]
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    started = time.perf_counter()
    outputs = engine.generate(prompts, params)  # type: ignore[arg-type]
    return sum(len(o.token_ids) for o in outputs) / (time.perf_counter() - started)


def first_logits(engine: LLMEngine, num_prompts: int = 64) -> torch.Tensor:
    """[prompts, vocab]: the next-token logits after each of the fixed prompts."""
    rng = random.Random(0)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(rng.randrange(4, 32))] for _ in range(num_prompts)]
    rows: dict[tuple[int, ...], torch.Tensor] = {}

    def observe(seqs: list[Sequence], logits: torch.Tensor) -> None:
        for seq, row in zip(seqs, logits, strict=True):
            rows.setdefault(tuple(seq.prompt_token_ids), row.float().cpu())

    engine.runner.logits_observer = observe
    engine.generate(prompts, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))  # type: ignore[arg-type]
    engine.runner.logits_observer = None
    return torch.stack([rows[tuple(p)] for p in prompts])


def projection_nbytes(engine: LLMEngine) -> int:
    """Bytes of the decoder layers' projection weights (what quantization touches)."""
    total = 0
    for layer in engine.runner.model.layers:
        for name in QUANTIZED:
            weight = getattr(layer, name)
            parts = weight.buffers() if isinstance(weight, torch.nn.Module) else [weight]
            total += sum(tensor_nbytes(t) for t in parts)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", help="the reference (and activation) dtype")
    parser.add_argument("--schemes", default="int8,int4")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads on the CPU")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    schemes = ["none", *args.schemes.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_model(Path(tmp) / "model", hidden_size=512, num_layers=8, num_heads=8,
                                num_kv_heads=8, vocab_size=VOCAB, initializer_range=0.02)
        engines = {scheme: new_engine(model, scheme, args) for scheme in schemes}
        best: dict[tuple[str, int], float] = {}
        for _ in range(args.rounds):  # interleaved: every scheme sees the same background load
            for batch in batches:
                for scheme, engine in engines.items():
                    rate = decode_rate(engine, batch, args.new_tokens)
                    best[scheme, batch] = max(best.get((scheme, batch), 0.0), rate)
        logits = {scheme: first_logits(engine) for scheme, engine in engines.items()}
        rows = [row(scheme, engines[scheme], logits, best, batches) for scheme in schemes]
    report = {"config": {**{k: str(v) for k, v in vars(args).items()}, "prompt_len": PROMPT_LEN,
                         "model": {"hidden": 512, "layers": 8, "heads": 8, "vocab": VOCAB}},
              "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                          "load_average": os.getloadavg(),
                          "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None},
              "rows": rows}
    print_table(rows, batches)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")


def row(scheme: str, engine: LLMEngine, logits: dict[str, torch.Tensor], best: dict[tuple[str, int], float],
        batches: list[int]) -> dict[str, object]:
    out: dict[str, object] = {"scheme": scheme, "weight_bytes": weight_nbytes(engine.runner.model),
                              "projection_bytes": projection_nbytes(engine)}
    for batch in batches:
        out[f"tokens_per_s_b{batch}"] = best[scheme, batch]
        out[f"speedup_b{batch}"] = best[scheme, batch] / best["none", batch]
    for margin in MARGINS:
        a = Agreement.of(logits["none"], logits[scheme], margin)
        out.update({"kl": a.kl, "agreement": a.agreement, "max_logit_error": a.max_logit_error,
                    f"clear_agreement_{margin}": a.clear_agreement, f"num_clear_{margin}": a.num_clear})
    return out


def print_table(rows: list[dict[str, object]], batches: list[int]) -> None:
    speed = "".join(f"{f'tok/s b{b}':>12}{'x':>6}" for b in batches)
    clear = "".join(f"{f'top1 >{m}':>14}" for m in MARGINS)
    print(f"{'scheme':<8}{'weights MB':>11}{'proj MB':>9}{speed}{'KL nats':>10}{'top1 all':>10}{clear}")
    for r in rows:
        cells = "".join(f"{r[f'tokens_per_s_b{b}']:>12.1f}{r[f'speedup_b{b}']:>6.2f}" for b in batches)
        agree = "".join(f"{r[f'clear_agreement_{m}']:>9.3f} ({r[f'num_clear_{m}']:>2})" for m in MARGINS)
        print(f"{r['scheme']:<8}{r['weight_bytes'] / 1e6:>11.1f}{r['projection_bytes'] / 1e6:>9.1f}{cells}"
              f"{r['kl']:>10.2e}{r['agreement']:>10.3f}{agree}")


if __name__ == "__main__":
    main()
