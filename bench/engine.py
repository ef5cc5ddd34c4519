"""Multi-adapter throughput: loranode (base only, 1..1,000 adapters) against transformers + peft.

Model: Llama-shaped, hidden 512, 8 layers, 8 heads, vocab 8,000 (~33M parameters), float32 on CPU
(or --device cuda). Adapters: rank 16 on all seven projections, random weights. Requests: prompt 64
tokens, 64 new tokens, greedy; adapters drawn uniformly or Zipf(1.1). Prints a table and writes
bench/results/engine.json with rows {"system", "adapters", "distribution", "tokens_per_s", ...}.

    python bench/engine.py            # the full run (256 requests)
    python bench/engine.py --quick    # fewer requests and systems, a quick look
    python bench/engine.py --targets-only --rounds 2   # the three target ratios, interleaved, best of 2
    python bench/engine.py --targets-only --prefix-cache --no-peft   # with chat rows, prefix cache off and on
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import tempfile
import time
from collections import OrderedDict
from concurrent.futures import Future
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node.devkit import ALL_TARGETS, make_tiny_model
from node.engine import EngineConfig, LLMEngine, SamplingParams
from node.lora.adapter import LoRATargetSpec, LoRAWeights
from node.lora.provider import AdapterSource, LoadState
from node.models.config import ModelConfig

RANK, PROMPT_LEN, NEW_TOKENS = 16, 64, 64
RESULTS = Path(__file__).resolve().parent / "results" / "engine.json"


class SyntheticAdapterProvider:
    """Random rank-16 adapters made on demand from their id (like a disk tier), an LRU in host memory."""

    def __init__(self, target: LoRATargetSpec, max_in_memory: int):
        self.target, self.max_in_memory = target, max_in_memory
        self.known: set[str] = set()
        self.cache: OrderedDict[str, LoRAWeights] = OrderedDict()

    def register(self, adapter_id: str, source: AdapterSource) -> None:
        self.known.add(adapter_id)

    def unregister(self, adapter_id: str) -> None:
        self.known.discard(adapter_id)
        self.cache.pop(adapter_id, None)

    def get(self, adapter_id: str) -> LoRAWeights:
        if adapter_id not in self.cache:
            self.cache[adapter_id] = synthetic_weights(self.target, int(adapter_id.split("-")[1]))
            while len(self.cache) > self.max_in_memory:
                self.cache.popitem(last=False)
        self.cache.move_to_end(adapter_id)
        return self.cache[adapter_id]

    def prefetch(self, adapter_id: str) -> Future[object]:
        future: Future[object] = Future()
        future.set_result(self.get(adapter_id))
        return future

    def state(self, adapter_id: str) -> LoadState:
        return LoadState.READY if adapter_id in self.known else LoadState.UNKNOWN


def synthetic_weights(target: LoRATargetSpec, seed: int) -> LoRAWeights:
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for layer in range(target.num_layers):
        for name, (d_in, d_out) in target.module_shapes:
            a = torch.randn(RANK, d_in, generator=g) / d_in ** 0.5
            b = torch.randn(d_out, RANK, generator=g) * (0.02 / RANK ** 0.5)
            modules[(layer, name)] = (a, b)
    return LoRAWeights.from_modules(modules)


def draw_adapters(num_requests: int, num_adapters: int, distribution: str, seed: int) -> list[str | None]:
    if num_adapters == 0:
        return [None] * num_requests
    rng = random.Random(seed)
    weights = [1.0] * num_adapters if distribution == "uniform" else \
        [1.0 / (k + 1) ** 1.1 for k in range(num_adapters)]
    return [f"ad-{k}" for k in rng.choices(range(num_adapters), weights=weights, k=num_requests)]


def run_loranode(model: Path, prompts: list[list[int]], adapters: list[str | None],
                 args: argparse.Namespace) -> tuple[float, float]:
    return loranode_rates(build_loranode(model, prompts, adapters, args), prompts, adapters)


def build_loranode(model: Path, prompts: list[list[int]], adapters: list[str | None],
                   args: argparse.Namespace) -> LLMEngine:
    """An engine on `args.device` / `args.dtype` serving `adapters` (random, rank 16), warmed up."""
    config = EngineConfig(model_path=model, device=args.device, dtype=args.dtype, max_num_seqs=256,
                          max_num_batched_tokens=args.max_batched_tokens, max_lora_rank=RANK,
                          max_adapter_slots=args.slots, max_model_len=PROMPT_LEN + NEW_TOKENS)
    cfg = ModelConfig.from_folder(model)
    target = LoRATargetSpec.of(cfg.num_layers, cfg.module_shapes())
    provider = SyntheticAdapterProvider(target, max_in_memory=2 * args.slots)
    engine = LLMEngine(config, provider=provider)  # type: ignore[arg-type]
    for a in {a for a in adapters if a is not None}:
        provider.register(a, AdapterSource(uri="synthetic", sha256=""))
    engine.generate(prompts[:4], SamplingParams(max_tokens=2, temperature=0), adapters[:4])  # warm-up
    return engine


def loranode_rates(engine: LLMEngine, prompts: list[list[int]], adapters: list[str | None]) -> tuple[float, float]:
    """Tokens per wall second and per CPU second of one `generate` of every request at once (greedy)."""
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    clock = Clock()
    outputs = engine.generate(prompts, params, adapters)
    return clock.rates(sum(len(o.token_ids) for o in outputs))


def run_chat(model: Path, num_requests: int, caching: bool, args: argparse.Namespace) -> tuple[float, float]:
    """bench/prefix_cache.py's chat traffic on this model: every request arrives at once."""
    from bench.prefix_cache import Traffic, build_engine, run

    traffic = Traffic(num_requests=num_requests)
    engine = build_engine(model, traffic, caching, device=args.device, dtype=args.dtype)
    clock = Clock()
    result = run(engine, "cache on" if caching else "cache off", 0, traffic)
    return clock.rates(round(result.tokens_per_s * result.wall_s))


def build_peft(model: Path, num_adapters: int, device: str = "cpu", dtype: torch.dtype = torch.float32):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).to(device).eval()
    config = LoraConfig(r=RANK, lora_alpha=RANK, target_modules=list(ALL_TARGETS), init_lora_weights=False)
    peft_model = get_peft_model(base, config, adapter_name="ad-0")
    for k in range(1, num_adapters):
        peft_model.add_adapter(f"ad-{k}", config)
    return peft_model.eval()


@torch.inference_mode()
def run_peft(peft_model, prompts: list[list[int]], adapters: list[str | None], grouped: bool,
             ) -> tuple[float, float]:
    """Static batches of 32: mixed-adapter generate(adapter_names=...) or set_adapter per adapter group."""
    prompts = prompts[:len(adapters)]
    names = [a or "__base__" for a in adapters]
    order = sorted(range(len(prompts)), key=lambda i: names[i]) if grouped else list(range(len(prompts)))
    batches: list[list[int]] = []
    for i in order:
        if batches and len(batches[-1]) < 32 and (not grouped or names[batches[-1][0]] == names[i]):
            batches[-1].append(i)
        else:
            batches.append([i])
    clock, generated = Clock(), 0
    for batch in batches:
        ids = torch.tensor([prompts[i] for i in batch], device=peft_model.device)
        kwargs = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        if grouped:
            peft_model.set_adapter(names[batch[0]])
            out = peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
        else:
            out = peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                      adapter_names=[names[i] for i in batch], **kwargs)
        generated += (out.shape[1] - ids.shape[1]) * len(batch)
    return clock.rates(generated)


def against_peft(device: str, num: int, shape: dict[str, int], rounds: int, deadline: float) -> dict[str, object]:
    """The same requests through the engine and through transformers + peft mixed-adapter `generate`
    (static batches of 32), both in bf16 on `device`: `num` requests, each on its own random rank-16
    adapter, PROMPT_LEN + NEW_TOKENS tokens, greedy, on a Llama-shaped model of `shape` (vocab 8,000);
    interleaved rounds, best of each. No round starts that would end past `deadline` (perf_counter
    seconds) by the last round's length; the first always runs. bench/gpu.py's row."""
    adapters: list[str | None] = [f"ad-{k}" for k in range(num)]
    options = argparse.Namespace(device=device, dtype="bfloat16", max_batched_tokens=2048, slots=2 * num)
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_model(Path(tmp) / "model", vocab_size=8000, initializer_range=0.02, **shape)  # type: ignore[arg-type]
        prompts = [[(37 * i + 11 * j) % 7990 + 3 for j in range(PROMPT_LEN)] for i in range(num)]
        engine = build_loranode(model, prompts, adapters, options)
        peft_model = build_peft(model, num, device, torch.bfloat16)
        best, done = {"loranode": 0.0, "peft": 0.0}, 0
        while done < rounds:
            begun = time.perf_counter()
            best["loranode"] = max(best["loranode"], loranode_rates(engine, prompts, adapters)[0])
            best["peft"] = max(best["peft"], run_peft(peft_model, prompts, adapters, grouped=False)[0])
            done += 1
            if time.perf_counter() + (time.perf_counter() - begun) > deadline:
                break
    return {"requests": num, "adapters": num, "rank": RANK, "prompt_tokens": PROMPT_LEN, "new_tokens": NEW_TOKENS,
            "model": shape, "dtype": "bfloat16", "loranode_tokens_per_s": best["loranode"],
            "peft_tokens_per_s": best["peft"], "speedup": best["loranode"] / best["peft"], "rounds": done}


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="64 requests, fewer systems")
    parser.add_argument("--requests", type=int, default=None)
    parser.add_argument("--peft-requests", type=int, default=None,
                        help="requests the peft baselines run (default 64: static batches of 32)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--slots", type=int, default=128)
    parser.add_argument("--max-batched-tokens", type=int, default=2048)
    parser.add_argument("--no-peft", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (both systems)")
    parser.add_argument("--targets-only", action="store_true",
                        help="only base-only, 1 adapter, 100 uniform and peft mixed: the issue's targets")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved repetitions of the systems")
    parser.add_argument("--prefix-cache", action="store_true",
                        help="add chat traffic rows (bench/prefix_cache.py's: 16 adapters, each with its own "
                             "512-token system prompt) with the prefix cache off and on")
    parser.add_argument("--out", type=Path, default=RESULTS, help="the JSON file to write")
    return parser.parse_args()


def main() -> None:
    args = arguments()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    num_requests = args.requests or (64 if args.quick else 256)
    peft_requests = min(num_requests, args.peft_requests or 64)
    counts = [1, 8, 100] if args.quick else [1, 8, 32, 100, 1000]
    distributions = ["uniform"] if args.quick else ["uniform", "zipf"]
    torch.manual_seed(0)
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_model(Path(tmp) / "model", hidden_size=512, num_layers=8, num_heads=8,
                                num_kv_heads=8, vocab_size=8000, initializer_range=0.02)
        rng = random.Random(0)
        prompts = [[rng.randrange(3, 8000) for _ in range(PROMPT_LEN)] for _ in range(num_requests)]

        def record(system: str, adapters: int, distribution: str, rates: tuple[float, float],
                   requests: int) -> None:
            rows.append({"system": system, "adapters": adapters, "distribution": distribution,
                         "tokens_per_s": round(rates[0], 1), "tokens_per_cpu_s": round(rates[1], 1),
                         "requests": requests})
            print(f"{system:<24} {adapters:>6} {distribution:<8} {requests:>5} {rates[0]:>10.1f} "
                  f"{rates[1]:>10.1f}", flush=True)
            write(args, rows)  # after every row: a long run that dies still leaves its results

        print(f"{'system':<24} {'adapt.':>6} {'dist':<8} {'reqs':>5} {'tokens/s':>10} {'tok/cpu-s':>10}")
        systems = systems_of(args, counts, distributions)
        for _ in range(args.rounds):  # rounds interleave the systems; the summary takes each one's best
            for n, dist in [*systems, (0, "-")] if args.rounds == 1 else systems:
                adapters = draw_adapters(num_requests, n, dist if dist != "-" else "uniform", seed=n)
                record("loranode", n, dist, run_loranode(model, prompts, adapters, args), num_requests)
            if args.prefix_cache:
                for caching in (False, True):
                    record("loranode+prefix-cache" if caching else "loranode-no-prefix-cache", 16, "chat",
                           run_chat(model, num_requests, caching, args), num_requests)
        if not args.no_peft:
            n = 100
            peft_model = build_peft(model, n)
            for dist in ["uniform"] if args.targets_only else distributions:
                adapters = draw_adapters(num_requests, n, dist, seed=n)[:peft_requests]
                record("peft-mixed-generate", n, dist, run_peft(peft_model, prompts, adapters, False),
                       peft_requests)
                if not args.targets_only:
                    tps = run_peft(peft_model, prompts, adapters, True)
                    record("peft-set-adapter", n, dist, tps, peft_requests)
    summarize(rows)
    print(f"wrote {args.out}")


def systems_of(args: argparse.Namespace, counts: list[int], distributions: list[str]) -> list[tuple[int, str]]:
    """(adapters, distribution) of each loranode row: base only first, one adapter once."""
    if args.targets_only:
        return [(0, "-"), (1, "-"), (100, "uniform")]
    return [(0, "-")] + [(n, d if n > 1 else "-") for d in distributions for n in counts
                         if n > 1 or d == distributions[0]]


def write(args: argparse.Namespace, rows: list[dict[str, object]]) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": args.device, "dtype": args.dtype, "threads": args.threads,
                                    "prompt_len": PROMPT_LEN, "new_tokens": NEW_TOKENS, "rank": RANK,
                                    "rows": rows}, indent=2) + "\n")


def summarize(rows: list[dict[str, object]]) -> None:
    """The issue's targets as ratios within this run, by wall time and by CPU time.

    Base-only runs first and last; the better of the two is the reference, so a noisy neighbour
    during one of them does not flatter the adapter runs.
    """
    def tps(key: str, system: str, adapters: int, dist: str) -> float | None:
        found = [float(r[key]) for r in rows  # type: ignore[arg-type]
                 if (r["system"], r["adapters"], r["distribution"]) == (system, adapters, dist)]
        return max(found) if found else None

    for key in ("tokens_per_s", "tokens_per_cpu_s"):
        base = tps(key, "loranode", 0, "-")
        checks = [("1 adapter / base-only", tps(key, "loranode", 1, "-"), base, 0.9),
                  ("100 uniform / base-only", tps(key, "loranode", 100, "uniform"), base, 0.6),
                  ("100 uniform / peft mixed generate", tps(key, "loranode", 100, "uniform"),
                   tps(key, "peft-mixed-generate", 100, "uniform"), 5.0),
                  ("chat: prefix cache on / off", tps(key, "loranode+prefix-cache", 16, "chat"),
                   tps(key, "loranode-no-prefix-cache", 16, "chat"), 2.0)]
        for name, num, den, target in checks:
            if num and den:
                ratio = num / den
                verdict = "met" if ratio >= target else "NOT met"
                print(f"[{key}] {name:<36} {ratio:6.2f}x  target {target}x  {verdict}")


class Clock:
    """Wall and process CPU time: with one thread, CPU time ignores the neighbours on a shared machine."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def rates(self, tokens: int) -> tuple[float, float]:
        return tokens / (time.perf_counter() - self.wall), tokens / (time.process_time() - self.cpu)


if __name__ == "__main__":
    main()
