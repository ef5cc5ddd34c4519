"""Attribution evidence: span index build time and size, and the per-inference matching cost.

Model: Llama-shaped, hidden 512, 8 layers, 8 heads, vocab 8,000 (the bench/engine.py shape), float32
on CPU; its tokenizer is the one the datasets and the answers are tokenized with.

1. Index build: a generated text dataset of --size-mb (the devkit corpus lines and style texts mixed
   with random words, in lines), tokenized and suffix-sorted; the time of each phase and the bytes on
   disk (token stream + suffix array).
2. Matching: a 256-token answer against 10 datasets (the big one and nine of --small-mb), the whole
   method 2 work of one receipt (tokenize the output, longest matches, counts, weights), for three
   answers: the engine's own greedy answer (matches little), one copied from dataset 0 (one long span)
   and one half copied; each as a ratio to the engine's time for the same request (64-token prompt,
   256 new tokens, greedy, alone). Rounds are interleaved and the best of each is kept.

    python bench/attribution.py                 # 100 MB dataset, 3 rounds
    python bench/attribution.py --size-mb 10    # a quicker look
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node.attribution.evidence import attribute
from node.attribution.index_store import DatasetRef, IndexStore
from node.attribution.rule import CURRENT_RULE
from node.attribution.span_index import SpanIndex
from node.attribution.token_rule import output_ids
from node.devkit import make_tiny_model
from node.devkit.corpus import STYLES, TEXT
from node.engine import EngineConfig, LLMEngine, SamplingParams
from node.lora.content_hash import dataset_content_hash
from node.protocol.hexstr import to_hex

RESULTS = Path(__file__).resolve().parent / "results" / "attribution.json"
ANSWER_TOKENS, PROMPT_TOKENS, NUM_DATASETS = 256, 64, 10


def make_text(size_bytes: int, seed: int) -> str:
    """Corpus lines and style texts mixed with random words, about `size_bytes` long."""
    rng = random.Random(seed)
    lines = TEXT.splitlines() + list(STYLES.values())
    words = sorted({w.strip(".,:;") for line in lines for w in line.split()})
    words += ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9))) for _ in range(5000)]
    out, size = [], 0
    while size < size_bytes:
        line = rng.choice(lines) if rng.random() < 0.3 else " ".join(rng.choices(words, k=rng.randint(6, 18))) + "."
        out.append(line)
        size += len(line) + 1
    return "\n".join(out) + "\n"


def build_big(root: Path, store: IndexStore, size_mb: float) -> tuple[dict[str, float], DatasetRef]:
    """The big dataset's index, built by the node's own code path (fetch, hash check, tokenize, sort, write)."""
    path = root / "big.txt"
    path.write_text(make_text(int(size_mb * 1e6), seed=0))
    ref = DatasetRef(0, to_hex(dataset_content_hash(path)), path.as_uri())
    info = store.build(ref)
    on_disk = sum(f.stat().st_size for f in store.folder(ref).iterdir())
    row = {"text_bytes": path.stat().st_size, "tokens": info.num_tokens, "tokenize_s": info.tokenize_s,
           "suffix_array_s": info.sort_s, "build_s": info.build_s, "index_bytes": on_disk,
           "index_bytes_per_text_byte": on_disk / path.stat().st_size}
    return row, ref


def answers(engine: LLMEngine, tokenizer: object, big: SpanIndex) -> tuple[list[int], dict[str, str]]:
    prompt = output_ids(tokenizer, TEXT)[:PROMPT_TOKENS]  # type: ignore[arg-type]
    out = engine.generate([prompt], SamplingParams(max_tokens=ANSWER_TOKENS, temperature=0, ignore_eos=True))[0]
    start = big.num_tokens // 3
    copied = tokenizer.decode([int(t) for t in big.tokens[start:start + ANSWER_TOKENS]])  # type: ignore[attr-defined]
    half = tokenizer.decode([int(t) for t in big.tokens[start:start + ANSWER_TOKENS // 2]])  # type: ignore[attr-defined]
    return prompt, {"engine answer": out.text, "copied": copied, "half copied": half + " " + out.text[: len(half)]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=float, default=100.0)
    ap.add_argument("--small-mb", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = make_tiny_model(root / "model", hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=8,
                                vocab_size=8000)
        tokenizer = AutoTokenizer.from_pretrained(str(model))
        store = IndexStore(root / "indexes", tokenizer)
        build, big_ref = build_big(root, store, args.size_mb)
        print(f"index build: {build['text_bytes'] / 1e6:.1f} MB text, {build['tokens']:,} tokens; tokenize "
              f"{build['tokenize_s']:.1f} s + suffix array {build['suffix_array_s']:.1f} s "
              f"(all: {build['build_s']:.1f} s);"
              f" index {build['index_bytes'] / 1e6:.1f} MB ({build['index_bytes_per_text_byte']:.2f} B per text B)")
        refs = [big_ref]
        for i in range(1, NUM_DATASETS):
            path = root / f"small-{i}.txt"
            path.write_text(make_text(int(args.small_mb * 1e6), seed=i))
            refs.append(DatasetRef(i, to_hex(dataset_content_hash(path)), path.as_uri()))
        indexes = {r.dataset_id: store.get(r) for r in refs}
        engine = LLMEngine(EngineConfig(model_path=model, device="cpu", max_num_seqs=4))
        try:
            rows = run_rounds(engine, tokenizer, store, indexes, args.rounds)
        finally:
            engine.shutdown()
    report(build, rows, args)


def run_rounds(engine: LLMEngine, tokenizer: object, store: IndexStore, indexes: dict[int, SpanIndex],
               rounds: int) -> dict[str, dict[str, float]]:
    prompt, texts = answers(engine, tokenizer, indexes[0])
    ids, lineage = list(indexes), [1_000] * NUM_DATASETS
    best_engine, best = float("inf"), {k: float("inf") for k in texts}
    scores: dict[str, int] = {}
    params = SamplingParams(max_tokens=ANSWER_TOKENS, temperature=0, ignore_eos=True)
    for _ in range(rounds):
        t0 = time.perf_counter()
        engine.generate([prompt], params)
        best_engine = min(best_engine, time.perf_counter() - t0)
        for name, text in texts.items():
            t0 = time.perf_counter()
            result = attribute(text, ids, lineage, indexes, tokenizer, store.tokenizer_id, CURRENT_RULE)  # type: ignore[arg-type]
            best[name] = min(best[name], time.perf_counter() - t0)
            scores[name] = sum(e.score for e in result.evidence)
    return {name: {"match_s": best[name], "engine_s": best_engine, "ratio": best[name] / best_engine,
                   "answer_tokens": len(output_ids(tokenizer, texts[name])), "evidence_tokens": scores[name]}  # type: ignore[arg-type]
            for name in texts}


def report(build: dict[str, float], rows: dict[str, dict[str, float]], args: argparse.Namespace) -> None:
    print(f"\nmatching a 256-token answer against {NUM_DATASETS} datasets ({args.size_mb:g} MB + "
          f"{NUM_DATASETS - 1} x {args.small_mb:g} MB), best of {args.rounds} rounds")
    print(f"{'answer':<16}{'tokens':>8}{'evidence':>10}{'match ms':>10}{'engine ms':>11}{'ratio':>8}")
    for name, r in rows.items():
        print(f"{name:<16}{r['answer_tokens']:>8}{r['evidence_tokens']:>10}{r['match_s'] * 1e3:>10.1f}"
              f"{r['engine_s'] * 1e3:>11.1f}{r['ratio'] * 100:>7.2f}%")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"args": vars(args), "build": build, "matching": rows,
                                   "target_ratio": 0.05, "numpy": np.__version__}, indent=1))
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
