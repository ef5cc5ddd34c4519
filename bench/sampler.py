"""The sampling step's cost per feature: one decode step's sampler (logits [batch, vocab] -> tokens) for a
batch of plain rows, against the same batch where half the rows ask for penalties, logit_bias,
min_tokens or logprobs. Interleaved rounds, best of each; ratios against the plain batch of the same run.
Prints a table and writes bench/results/sampler.json.

    python bench/sampler.py [--batch 64] [--vocab 32000] [--history 512] [--rounds 5] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node.engine.sampler import Sampler, SamplingBatch
from node.engine.sampling import SamplingParams

RESULTS = Path(__file__).resolve().parent / "results" / "sampler.json"
FEATURES = {
    "plain": {},
    "presence+frequency": {"presence_penalty": 0.5, "frequency_penalty": 0.5},
    "repetition": {"repetition_penalty": 1.2},
    "logit_bias (8 ids)": {"logit_bias": {i * 97: 5.0 for i in range(8)}},
    "min_tokens": {"min_tokens": 10_000},
    "logprobs (top 5)": {"logprobs": 5},
    "all of them": {"presence_penalty": 0.5, "frequency_penalty": 0.5, "repetition_penalty": 1.2,
                    "logit_bias": {i * 97: 5.0 for i in range(8)}, "min_tokens": 10_000, "logprobs": 5},
}


def _batch(args: argparse.Namespace, extra: dict[str, object]) -> SamplingBatch:
    g = torch.Generator().manual_seed(0)
    plain = SamplingParams(max_tokens=10_000, temperature=0.8, top_p=0.95)
    asked = SamplingParams(max_tokens=10_000, temperature=0.8, top_p=0.95, **extra)  # type: ignore[arg-type]
    params = [asked if i % 2 else plain for i in range(args.batch)]
    history = [torch.randint(args.vocab, (args.history,), generator=g).tolist() for _ in range(args.batch)]
    return SamplingBatch(params, [torch.Generator(device=args.device).manual_seed(i) for i in range(args.batch)],
                         history, history)


def _time(sampler: Sampler, logits: torch.Tensor, batch: SamplingBatch, steps: int, device: str) -> float:
    sampler(logits, batch)  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        sampler(logits, batch)
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=32_000)
    parser.add_argument("--history", type=int, default=512, help="prompt and output tokens per row")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    logits = torch.randn(args.batch, args.vocab, generator=torch.Generator().manual_seed(1)).to(args.device)
    batches = {name: _batch(args, extra) for name, extra in FEATURES.items()}
    sampler, best = Sampler(frozenset({2})), {name: float("inf") for name in FEATURES}
    for _ in range(args.rounds):
        for name, batch in batches.items():
            best[name] = min(best[name], _time(sampler, logits, batch, args.steps, args.device))
    rows = [{"feature": name, "ms_per_step": round(ms, 3), "vs_plain": round(ms / best["plain"], 2)}
            for name, ms in best.items()]
    print(f"batch {args.batch} (half asking), vocab {args.vocab}, history {args.history}, {args.device}")
    print(f"{'feature':<22}{'ms/step':>10}{'vs plain':>10}")
    for row in rows:
        print(f"{row['feature']:<22}{row['ms_per_step']:>10}{row['vs_plain']:>9}x")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"config": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
