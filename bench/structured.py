"""Structured output: the cost of JSON-schema grammars in a batch, and of compiling a new schema.

Model: Llama-shaped, hidden 512, 8 layers, vocab 8,000 (as bench/engine.py), float32 on CPU (or
--device cuda). A batch of 32 requests (prompt 32 tokens, 64 new tokens, greedy), half of them
constrained by a JSON schema (16 different schemas, compiled before the timed runs; each allows
far more than 64 tokens, so every answer runs to max_tokens and both batches write the same
number of tokens), against the same batch unconstrained. Rounds alternate the two; each takes its
best. Also: compile time of new schemas (p50, p99), the time to fill and apply the step's bitmask,
and with --compare the same figures for llguidance (when installed), the engine we did not pick.
Prints a table and writes bench/results/structured.json.

    python bench/structured.py --rounds 3 --threads 1 --compare
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node.devkit import make_tiny_model
from node.engine import EngineConfig, LLMEngine, SamplingParams
from node.engine import model_runner as runner_module
from node.engine.grammar import GrammarCompiler, GrammarSpec

BATCH, PROMPT_LEN, NEW_TOKENS, VOCAB = 32, 32, 64, 8000
RESULTS = Path(__file__).resolve().parent / "results" / "structured.json"
TYPES = [{"type": "integer"}, {"type": "boolean"}, {"type": "string", "maxLength": 12},
         {"enum": ["red", "green", "blue"]}, {"type": "array", "items": {"type": "number"}, "maxItems": 4}]


def batch_schema(i: int) -> dict[str, Any]:
    """At least 40 strings: always more than NEW_TOKENS tokens, so the answer runs to max_tokens."""
    return {"type": "object", "properties": {f"notes_{i}": {"type": "array", "items": {"type": "string"},
                                                            "minItems": 40}}, "required": [f"notes_{i}"]}


def new_schema(rng: random.Random, i: int) -> dict[str, Any]:
    """A schema never seen before: 3 to 12 properties of mixed types, one nested object."""
    props = {f"p{i}_{j}": rng.choice(TYPES) for j in range(rng.randint(3, 12))}
    props[f"inner{i}"] = {"type": "object", "properties": {"x": rng.choice(TYPES), "y": rng.choice(TYPES)},
                          "required": ["x"]}
    return {"type": "object", "properties": props, "required": rng.sample(sorted(props), 2),
            "additionalProperties": False}


def run_batch(engine: LLMEngine, prompts: list[list[int]], constrained: bool) -> tuple[float, int]:
    params = []
    for i in range(BATCH):
        grammar = GrammarSpec.json_schema(batch_schema(i // 2)) if constrained and i % 2 == 0 else None
        params.append(SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=grammar is None,
                                     grammar=grammar))
    started = time.perf_counter()
    outs = engine.generate(list(prompts), params)
    seconds = time.perf_counter() - started
    tokens = sum(o.num_completion_tokens for o in outs)
    assert tokens == BATCH * NEW_TOKENS, "every answer must run to max_tokens for a like-for-like ratio"
    return tokens / seconds, tokens


def timed_masks(samples: list[float]) -> Any:
    """Wraps the runner's bitmask step, recording how long each call takes."""
    original = runner_module._mask_grammars

    def wrapper(logits: torch.Tensor, seqs: list[Any]) -> None:
        started = time.perf_counter()
        original(logits, seqs)
        if any(s.grammar is not None for s in seqs):
            samples.append(time.perf_counter() - started)

    return original, wrapper


def compile_times(engine: LLMEngine, num: int) -> tuple[list[float], float]:
    started = time.perf_counter()
    compiler = GrammarCompiler(engine.tokenizer, engine.model_config.vocab_size, [engine.tokenizer.eos_token_id])
    info_s = time.perf_counter() - started
    rng, times = random.Random(1), []
    for i in range(num):
        spec = GrammarSpec.json_schema(new_schema(rng, i))
        started = time.perf_counter()
        compiler.compile(spec)
        times.append(time.perf_counter() - started)
    return times, info_s


def compare_llguidance(engine: LLMEngine, num: int) -> dict[str, float] | None:
    """llguidance on the same tokenizer and schemas: compile (grammar + matcher) and a 16-row fill."""
    try:
        import llguidance
        import llguidance.hf
        import llguidance.torch
    except ImportError:
        return None
    tok = llguidance.hf.from_tokenizer(engine.tokenizer, n_vocab=engine.model_config.vocab_size)
    rng, times = random.Random(1), []
    for i in range(num):
        schema = new_schema(rng, i)
        started = time.perf_counter()
        llguidance.LLMatcher(tok, llguidance.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": False}))
        times.append(time.perf_counter() - started)
    matchers = [llguidance.LLMatcher(tok, llguidance.LLMatcher.grammar_from_json_schema(
        batch_schema(i), defaults={"whitespace_flexible": False})) for i in range(BATCH // 2)]
    bitmask = llguidance.torch.allocate_token_bitmask(len(matchers), engine.model_config.vocab_size)
    fills, gen = [], torch.Generator().manual_seed(0)
    for _ in range(NEW_TOKENS):
        logits = torch.randn(len(matchers), engine.model_config.vocab_size, generator=gen)
        started = time.perf_counter()
        for row, m in enumerate(matchers):
            llguidance.torch.fill_next_token_bitmask(m, bitmask, row)
        llguidance.torch.apply_token_bitmask_inplace(logits, bitmask)
        fills.append(time.perf_counter() - started)
        for m, token in zip(matchers, logits.argmax(-1).tolist(), strict=True):
            m.consume_token(token)
    return {"compile_p50_ms": _ms(statistics.median(times)), "compile_p99_ms": _ms(_p99(times)),
            "mask_per_step_p50_ms": _ms(statistics.median(fills))}


def _p99(values: list[float]) -> float:
    return sorted(values)[min(len(values) - 1, int(len(values) * 0.99))]


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; each side takes its best")
    parser.add_argument("--schemas", type=int, default=200, help="new schemas compiled for the p50/p99")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--compare", action="store_true", help="also measure llguidance (if installed)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_model(Path(tmp) / "model", hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=8,
                                vocab_size=VOCAB, initializer_range=0.02)
        engine = LLMEngine(EngineConfig(model_path=model, device=args.device, max_num_seqs=BATCH,
                                        max_model_len=256, max_num_batched_tokens=2048))
        rng = random.Random(0)
        prompts = [[rng.randrange(3, VOCAB) for _ in range(PROMPT_LEN)] for _ in range(BATCH)]
        for i in range(BATCH // 2):  # compile outside the timed runs (the API compiles before admission)
            engine.grammars.compile(GrammarSpec.json_schema(batch_schema(i)))
        run_batch(engine, prompts, False)  # warm-up
        masks: list[float] = []
        original, wrapper = timed_masks(masks)
        free, mixed = [], []
        for _ in range(args.rounds):
            free.append(run_batch(engine, prompts, False)[0])
            runner_module._mask_grammars = wrapper  # type: ignore[assignment]
            try:
                mixed.append(run_batch(engine, prompts, True)[0])
            finally:
                runner_module._mask_grammars = original  # type: ignore[assignment]
        compiles, info_s = compile_times(engine, args.schemas)
        result: dict[str, Any] = {
            "device": args.device, "batch": BATCH, "constrained": BATCH // 2, "new_tokens": NEW_TOKENS,
            "vocab": VOCAB, "rounds": args.rounds, "engine": "xgrammar",
            "unconstrained_tokens_per_s": round(max(free), 1), "mixed_tokens_per_s": round(max(mixed), 1),
            "ratio": round(max(mixed) / max(free), 3), "target_ratio": 0.9,
            "compile_p50_ms": _ms(statistics.median(compiles)), "compile_p99_ms": _ms(_p99(compiles)),
            "tokenizer_info_ms": _ms(info_s), "mask_per_step_p50_ms": _ms(statistics.median(masks)),
            "mask_per_step_p99_ms": _ms(_p99(masks)),
        }
        if args.compare:
            result["llguidance"] = compare_llguidance(engine, args.schemas)
    report(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


def report(r: dict[str, Any]) -> None:
    verdict = "ok" if r["ratio"] >= r["target_ratio"] else "BELOW TARGET"
    rows = [
        ("unconstrained batch of 32, tokens/s", f"{r['unconstrained_tokens_per_s']:.1f}"),
        ("half JSON-schema batch, tokens/s", f"{r['mixed_tokens_per_s']:.1f}"),
        ("ratio (target >= 0.9x)", f"{r['ratio']:.3f}x  {verdict}"),
        ("compile a new schema, p50 / p99 ms", f"{r['compile_p50_ms']:.2f} / {r['compile_p99_ms']:.2f}"),
        ("tokenizer info (once per tokenizer), ms", f"{r['tokenizer_info_ms']:.1f}"),
        ("bitmask fill+apply per step (16 rows), p50 / p99 ms",
         f"{r['mask_per_step_p50_ms']:.3f} / {r['mask_per_step_p99_ms']:.3f}"),
    ]
    llg = r.get("llguidance")
    if llg:
        rows += [("llguidance: compile p50 / p99 ms", f"{llg['compile_p50_ms']:.2f} / {llg['compile_p99_ms']:.2f}"),
                 ("llguidance: fill+apply per step (16 rows), p50 ms", f"{llg['mask_per_step_p50_ms']:.3f}")]
    print(f"structured output on {r['device']} (xgrammar), vocab {r['vocab']}, best of {r['rounds']} rounds")
    for name, value in rows:
        print(f"  {name:<52} {value}")


if __name__ == "__main__":
    main()
