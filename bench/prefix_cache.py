"""Prefix caching on chat traffic: the engine with the cache against the engine without it, same run.

Traffic: 256 chat requests over 16 adapters, each adapter with its own 512-token system prompt, each
request that prompt plus a 64-token user turn of its own, 16 new tokens (greedy); all requests arrive
at once, adapters in shuffled order. Each round draws new system prompts, so every round starts with
nothing of its prompts cached (what an earlier round left is evicted as the pool needs blocks).

Model: Llama-shaped, hidden 256, 2 layers, 4 heads and 1 KV head (keys and values a quarter of the
hidden size, as in Llama 3), vocab 4,000, float32 on the CPU, one torch thread; adapters rank 16 on
all seven projections, random weights. KV blocks of 16 tokens, enough of them for every request at
once, so that the engine without the cache is never short of memory. The engine's default token
budget (4,096 per step); every request may run at once (max_num_seqs 256).

Rounds interleave the two engines; the summary takes the best of each. On a shared machine wall time
moves with the neighbours' load, so TTFT and throughput are also given in this process's CPU time
(with one thread, the work done). Prints a table and writes bench/results/prefix_cache.json.

    python bench/prefix_cache.py              # 256 requests, 2 rounds
    python bench/prefix_cache.py --requests 64 --rounds 1   # a quick look
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
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.engine import RANK, SyntheticAdapterProvider
from node.devkit import make_tiny_model
from node.engine import EngineConfig, LLMEngine, SamplingParams
from node.engine.sequence import RequestOutput, Sequence
from node.lora.adapter import LoRATargetSpec
from node.lora.provider import AdapterSource
from node.models.config import ModelConfig

RESULTS = Path(__file__).resolve().parent / "results" / "prefix_cache.json"
VOCAB, BLOCK_SIZE, HIDDEN, LAYERS, KV_HEADS = 4000, 16, 256, 2, 1


@dataclass(frozen=True)
class Traffic:
    num_requests: int = 256
    num_adapters: int = 16
    system_len: int = 512
    user_len: int = 64
    new_tokens: int = 16

    def requests(self, seed: int) -> list[tuple[list[int], str]]:
        """(prompt, adapter) per request: adapter k's system prompt, then a user turn of its own."""
        rng = random.Random(seed)
        systems = [[rng.randrange(3, VOCAB) for _ in range(self.system_len)] for _ in range(self.num_adapters)]
        adapters = [i % self.num_adapters for i in range(self.num_requests)]
        rng.shuffle(adapters)
        return [(systems[k] + [rng.randrange(3, VOCAB) for _ in range(self.user_len)], f"ad-{k}")
                for k in adapters]


@dataclass(frozen=True)
class Result:
    mode: str
    round: int
    ttft_p50_s: float
    ttft_p90_s: float
    ttft_p50_cpu_s: float  # this process's CPU time until the median first token (one thread: no neighbours)
    tokens_per_s: float  # completion tokens per second of the whole run
    tokens_per_cpu_s: float  # per second of this process's CPU time (with one thread: the neighbours' load aside)
    wall_s: float
    hit_rate: float  # prefix-cache hit tokens per prompt token looked up, this round


def build_engine(model: Path, traffic: Traffic, caching: bool, device: str = "cpu", dtype: str = "float32",
                 ) -> LLMEngine:
    max_len = traffic.system_len + traffic.user_len + traffic.new_tokens
    blocks_per_request = -(-max_len // BLOCK_SIZE)
    config = EngineConfig(model_path=model, device=device, dtype=dtype, max_num_seqs=traffic.num_requests,
                          block_size=BLOCK_SIZE, num_kv_blocks=traffic.num_requests * blocks_per_request + 16,
                          max_lora_rank=RANK, max_adapter_slots=traffic.num_adapters, max_model_len=max_len + 1,
                          prefix_caching=caching)  # the default token budget per step (4,096)
    cfg = ModelConfig.from_folder(model)
    provider = SyntheticAdapterProvider(LoRATargetSpec.of(cfg.num_layers, cfg.module_shapes()),
                                        max_in_memory=2 * traffic.num_adapters)
    for k in range(traffic.num_adapters):
        provider.register(f"ad-{k}", AdapterSource(uri="synthetic", sha256=""))
    engine = LLMEngine(config, provider=provider)  # type: ignore[arg-type]
    warm = [[5] * 20] * traffic.num_adapters
    engine.generate(list(warm), SamplingParams(max_tokens=2, temperature=0),  # adapters into their slots
                    [f"ad-{k}" for k in range(traffic.num_adapters)])
    return engine


def run(engine: LLMEngine, mode: str, round_: int, traffic: Traffic) -> Result:
    params = SamplingParams(max_tokens=traffic.new_tokens, temperature=0, ignore_eos=True)
    first: dict[str, float] = {}
    first_cpu: dict[str, float] = {}
    tokens: dict[str, int] = {}
    before = engine.kv_cache_stats()

    def on_sampled(seqs: list[Sequence], _logits: torch.Tensor) -> None:  # a token is sampled for each
        now, cpu_now = time.perf_counter(), time.process_time()
        for seq in seqs:
            first.setdefault(seq.request_id, now)
            first_cpu.setdefault(seq.request_id, cpu_now)

    def on_finished(output: RequestOutput) -> None:
        tokens[output.request_id] = output.num_completion_tokens

    engine.runner.logits_observer = on_sampled
    start, cpu_start = time.perf_counter(), time.process_time()
    for i, (prompt, adapter) in enumerate(traffic.requests(seed=1000 + round_)):
        engine.add_request(prompt, params, adapter, request_id=f"{mode}-{round_}-{i}", waiter=on_finished)
    while engine.has_unfinished():
        engine.step()
    engine.runner.logits_observer = None
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    ttft = sorted(t - start for t in first.values())
    after = engine.kv_cache_stats()
    queried = after.num_queried_tokens - before.num_queried_tokens
    return Result(mode=mode, round=round_, ttft_p50_s=statistics.median(ttft),
                  ttft_p90_s=ttft[int(0.9 * (len(ttft) - 1))],
                  ttft_p50_cpu_s=statistics.median(t - cpu_start for t in first_cpu.values()),
                  tokens_per_s=sum(tokens.values()) / wall,
                  tokens_per_cpu_s=sum(tokens.values()) / cpu,
                  wall_s=wall, hit_rate=(after.num_hit_tokens - before.num_hit_tokens) / queried if queried else 0.0)


def summary(results: list[Result]) -> dict[str, float]:
    def best(mode: str) -> tuple[float, float]:
        rows = [r for r in results if r.mode == mode]
        return (min(r.ttft_p50_s for r in rows), min(r.ttft_p50_cpu_s for r in rows),
                max(r.tokens_per_s for r in rows), max(r.tokens_per_cpu_s for r in rows))

    (ttft_on, ttft_cpu_on, tps_on, cpu_on), (ttft_off, ttft_cpu_off, tps_off, cpu_off) = best("cache on"), best(
        "cache off")
    return {"ttft_p50_off_s": ttft_off, "ttft_p50_on_s": ttft_on, "ttft_p50_speedup": ttft_off / ttft_on,
            "ttft_p50_cpu_off_s": ttft_cpu_off, "ttft_p50_cpu_on_s": ttft_cpu_on,
            "ttft_p50_cpu_speedup": ttft_cpu_off / ttft_cpu_on,
            "tokens_per_s_off": tps_off, "tokens_per_s_on": tps_on, "throughput_speedup": tps_on / tps_off,
            "tokens_per_cpu_s_off": cpu_off, "tokens_per_cpu_s_on": cpu_on, "cpu_throughput_speedup": cpu_on / cpu_off}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of both engines")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (one: CPU time is meaningful)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    traffic = Traffic(num_requests=args.requests)
    results: list[Result] = []
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_model(Path(tmp) / "model", hidden_size=HIDDEN, num_layers=LAYERS, num_heads=4,
                                num_kv_heads=KV_HEADS, vocab_size=VOCAB, initializer_range=0.02,
                                max_position_embeddings=1024)
        engines = {"cache off": build_engine(model, traffic, False), "cache on": build_engine(model, traffic, True)}
        print(f"{'mode':<10} {'round':>5} {'TTFT p50 s':>10} {'TTFT p90 s':>10} {'p50 cpu-s':>9} {'tokens/s':>9} "
              f"{'tok/cpu-s':>9} {'wall s':>7} {'hit rate':>8}")
        for round_ in range(args.rounds):
            for mode, engine in engines.items():
                r = run(engine, mode, round_, traffic)
                results.append(r)
                print(f"{r.mode:<10} {r.round:>5} {r.ttft_p50_s:>10.3f} {r.ttft_p90_s:>10.3f} {r.ttft_p50_cpu_s:>9.3f} "
                      f"{r.tokens_per_s:>9.1f} "
                      f"{r.tokens_per_cpu_s:>9.1f} {r.wall_s:>7.1f} {r.hit_rate:>8.1%}", flush=True)
    best = summary(results)
    print(f"best of each: TTFT p50 {best['ttft_p50_off_s']:.3f} s -> {best['ttft_p50_on_s']:.3f} s "
          f"({best['ttft_p50_speedup']:.1f}x; in CPU seconds {best['ttft_p50_cpu_speedup']:.1f}x), "
          f"throughput {best['tokens_per_s_off']:.1f} -> "
          f"{best['tokens_per_s_on']:.1f} tokens/s ({best['throughput_speedup']:.1f}x; per CPU second "
          f"{best['cpu_throughput_speedup']:.1f}x)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"traffic": asdict(traffic), "model": {
        "hidden_size": HIDDEN, "num_layers": LAYERS, "num_heads": 4, "num_kv_heads": KV_HEADS, "vocab_size": VOCAB,
        "dtype": "float32", "device": "cpu", "lora_rank": RANK, "block_size": BLOCK_SIZE, "threads": args.threads},
        "rows": [asdict(r) for r in results], "summary": best}, indent=2) + "\n")


if __name__ == "__main__":
    main()
